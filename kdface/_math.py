"""Small array helpers shared by the losses, the distillation terms and the heads."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["L2_NORM_EPS", "constant_shift", "l2_normalize", "logsumexp"]

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


def logsumexp(x: jax.Array, *, axis: int = -1, keepdims: bool = False,
              bound: float | None = None) -> jax.Array:
    """``log Σ exp(x)`` along ``axis``: ``jax.nn.logsumexp``, or, given ``bound`` (no logit above
    ``bound`` and every row's largest at least ``-bound``: ``s·cos θ`` logits of a margin head
    with scale ``s``), the same sum taken around a constant shift instead of the row's maximum.

    Why: the maximum is a pass of its own over the ``[N, C]`` logits, and with the class axis
    split over chips an all-reduce too; on a TPU each such pass over 1,024 x 10,718 logits costs
    ~0.13 ms (the compiler's cycles, benchmarks/TPU_PLAN.md). A constant shift ``c`` keeps the
    sum finite and its largest term normal when ``bound - c + log C`` stays below the float's
    ``log(max)`` and ``-bound - c`` above its ``log(tiny)``; where no ``c`` can (a bound near
    ``(log(max) - log(tiny) - log C) / 2``, 80 at float32 for 2 M classes), the maximum is used.
    The value and gradient are the same function; only the rounding differs (the shifted
    arguments ``x - c`` are exact for ``c = 0``).
    """
    shift = constant_shift(bound, x.shape[axis], x.dtype)
    if shift is not None:
        total = jnp.sum(jnp.exp(x - shift) if shift else jnp.exp(x), axis=axis,
                        keepdims=keepdims)
        return jnp.log(total) + shift if shift else jnp.log(total)
    return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)


def constant_shift(bound: float | None, classes: int, dtype) -> float | None:
    """The constant ``c`` for which ``Σ exp(x - c)`` over ``classes`` logits within ``bound``
    (none above it, each row's largest at least ``-bound``) stays finite with a normal largest
    term in ``dtype`` (``logsumexp``), or None (no bound, or none that can)."""
    if bound is None:
        return None
    info = jnp.finfo(dtype)
    high = math.log(float(info.max)) - 1.0   # exp stays below max with a margin of e
    low = math.log(float(info.tiny)) + 1.0   # the largest term stays a normal number
    lowest = float(bound) + math.log(classes) - high
    highest = -float(bound) - low
    return min(max(0.0, lowest), highest) if lowest <= highest else None
