"""Heads on top of a backbone: margin classifier, plain softmax classifier, 5-point landmarks.

* :class:`MarginHead` gives ``cos(theta)`` between the L2-normalized embedding and L2-normalized
  class weights, the input of SphereFace / CosFace / ArcFace (``kdface.losses.sphereface_logits``,
  ``cosface_logits``, ``arcface_logits`` apply the margin and the scale). Used by seeds wang2019
  (SphereFace teacher), nikitin2020 (CosFace base loss) and yan2019 (ArcFace).
* :class:`SoftmaxHead`: plain linear logits (the softmax classifier whose soft predictions seed
  kd_transfer eqs. (1)-(2) distill).
* :class:`LandmarkHead`: 5-point landmark regression from an embedding or a feature map (seed
  kd_transfer, face alignment, eqs. (6)-(7)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_NORM_EPS = 1e-12


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_embeddings(x: jax.Array, size: int, who: str) -> None:
    if x.ndim != 2 or x.shape[1] != size:
        raise ValueError(f"{who} expects embeddings [B, {size}], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who} expects float embeddings, got {x.dtype}")


def l2_normalize(x: jax.Array, axis: int) -> jax.Array:
    """``x / max(||x||_2, 1e-12)`` along ``axis`` (the PyTorch ``F.normalize`` convention)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS ** 2))


class MarginHead(nnx.Module):
    """Cosine classifier: ``embeddings [B, D] -> cos_theta [B, C]`` in ``[-1, 1]``.

    ``cos_theta[b, c] = <x_b / ||x_b||, w_c / ||w_c||>`` with ``weight: [D, C]`` (one column per
    identity, initialised N(0, 0.01) as insightface). Computed in float32 for bf16/f16 inputs.
    The margin is *not* applied here (kdface.losses margin functions do it, given labels).
    """

    def __init__(self, embedding_size: int, num_classes: int, *, rngs: nnx.Rngs):
        _check_size("embedding_size", embedding_size)
        _check_size("num_classes", num_classes)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        init = jax.nn.initializers.normal(0.01)
        self.weight = nnx.Param(init(rngs.params(), (embedding_size, num_classes), jnp.float32))

    def __call__(self, embeddings: jax.Array) -> jax.Array:
        _check_embeddings(embeddings, self.embedding_size, "MarginHead")
        x = l2_normalize(embeddings.astype(jnp.float32), axis=1)
        w = l2_normalize(self.weight[...].astype(jnp.float32), axis=0)
        return jnp.clip(x @ w, -1.0, 1.0)


class SoftmaxHead(nnx.Module):
    """Plain linear classifier: ``embeddings [B, D] -> logits [B, C]`` (``x W + b``)."""

    def __init__(self, embedding_size: int, num_classes: int, *, rngs: nnx.Rngs,
                 use_bias: bool = True):
        _check_size("embedding_size", embedding_size)
        _check_size("num_classes", num_classes)
        self.embedding_size = embedding_size
        self.linear = nnx.Linear(embedding_size, num_classes, use_bias=use_bias, rngs=rngs)

    def __call__(self, embeddings: jax.Array) -> jax.Array:
        _check_embeddings(embeddings, self.embedding_size, "SoftmaxHead")
        return self.linear(embeddings)


class LandmarkHead(nnx.Module):
    """Landmark regression: ``[B, D]`` embedding or ``[B, H, W, D]`` feature map -> ``[B, P, 2]``.

    A feature map is global-average-pooled over ``H, W`` first; then one linear layer gives
    ``2 * num_points`` numbers read as ``(x, y)`` per point (seed kd_transfer regresses the
    5 points with a fully connected mapping on the hidden layer). The coordinate units are
    whatever the training targets use (kdface's pipeline and evaluation use pixel
    coordinates of the network input).
    """

    def __init__(self, in_features: int, num_points: int = 5, *, rngs: nnx.Rngs):
        _check_size("in_features", in_features)
        _check_size("num_points", num_points)
        self.in_features = in_features
        self.num_points = num_points
        self.linear = nnx.Linear(in_features, 2 * num_points, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 4:
            x = jnp.mean(x, axis=(1, 2))
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"LandmarkHead expects [B, {self.in_features}] or "
                             f"[B, H, W, {self.in_features}], got shape {tuple(x.shape)}")
        return self.linear(x).reshape(x.shape[0], self.num_points, 2)
