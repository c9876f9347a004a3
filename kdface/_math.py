"""Small array helpers shared by the losses, the distillation terms and the heads."""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["L2_NORM_EPS", "l2_normalize"]

# The norm floor of every JAX-side L2 normalization in kdface (PyTorch ``F.normalize``'s
# default): a vector with norm below it is divided by it instead, so an all-zero row gives a
# zero direction with finite gradients rather than 0/0. The host-side evaluation metric
# (``kdface.metrics.l2_normalize``) follows scikit-learn's rule instead, on purpose.
L2_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = L2_NORM_EPS) -> jax.Array:
    """``x / max(||x||₂, eps)`` along ``axis``, computed as ``x * rsqrt(max(||x||², eps²))``.

    x: any float array; the result has its shape and dtype. Half-precision inputs are
    normalized in float32 (``eps²`` underflows float16).
    """
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    sq = jnp.sum(wide * wide, axis=axis, keepdims=True)
    return (wide * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)
