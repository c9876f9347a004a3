"""Heads on top of a backbone: margin classifier, plain softmax classifier, 5-point landmarks.

* :class:`MarginHead` gives ``cos(theta)`` between the L2-normalized embedding and L2-normalized
  class weights, the input of SphereFace / CosFace / ArcFace (``kdface.losses.sphereface_logits``,
  ``cosface_logits``, ``arcface_logits`` apply the margin and the scale). Used by Wang et al. 2019
  (SphereFace teacher), Nikitin et al. 2020 (CosFace base loss) and Yan et al. 2019 (ArcFace).
* :class:`SoftmaxHead`: plain linear logits (the softmax classifier whose soft predictions
  Wang et al. 2017 eqs. (1)-(2) distill).
* :class:`LandmarkHead`: 5-point landmark regression from an embedding or a feature map
  (Wang et al. 2017, face alignment, eqs. (6)-(7)).
* :func:`shard_margin_heads`: splits the class axis of margin heads over a device mesh axis, the
  memory scaling of insightface's Partial FC (An et al., Partial FC: Training 10 Million
  Identities on a Single Machine, ICCVW 2021) without hand-written collectives: each device holds
  ``C / devices`` class columns, their gradient and optimizer state, and the matching ``[B, C /
  devices]`` slice of the logits; XLA inserts the all-gather of the (small) embeddings and the
  cross-device reductions of the softmax. A class count the devices do not divide (MS1M's
  85,742 on 4 or 64 chips) is padded with zero columns to the next multiple
  (:func:`padded_class_count`), and the head gives the padded ``[B, C_pad]``: the margin
  functions take ``classes=`` and mask the padding (``kdface.losses.mask_padding_classes``).
  Cutting the output back to ``[B, C]`` made an array the devices do not divide, which XLA
  re-partitions: on 64 v5e chips it all-gathered the cosines (a 31 ms step instead of 20).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kdface._math import L2_NORM_EPS, l2_normalize
from kdface._platform import target_platform


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_embeddings(x: jax.Array, size: int, who: str) -> None:
    if x.ndim != 2 or x.shape[1] != size:
        raise ValueError(f"{who} expects embeddings [B, {size}], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who} expects float embeddings, got {x.dtype}")


class MarginHead(nnx.Module):
    """Cosine classifier: ``embeddings [B, D] -> cos_theta [B, C]`` in ``[-1, 1]``.

    ``cos_theta[b, c] = <x_b / ||x_b||, w_c / ||w_c||>`` with ``weight: [D, C]`` (one column per
    identity, initialised N(0, 0.01) as insightface). Computed in float32 for bf16/f16 inputs.
    The margin is *not* applied here (kdface.losses margin functions do it, given labels).

    ``class_sharding`` (``None``: replicated; set by :func:`shard_margin_heads`) is the sharding
    the output is constrained to, class axis split over a mesh axis. A sharded head's weight may
    be wider than ``num_classes`` (zero columns padding it to a multiple of the devices); the
    output is then as wide, ``[B, C_pad]``, its padding columns' cosines 0. Every consumer
    masks them with ``num_classes`` (``cosface_logits(..., classes=head.num_classes)``,
    ``kdface.losses.mask_padding_classes`` for plain logits), so they never reach a softmax,
    get no gradient and stay zero.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, rngs: nnx.Rngs):
        _check_size("embedding_size", embedding_size)
        _check_size("num_classes", num_classes)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        init = jax.nn.initializers.normal(0.01)
        self.weight = nnx.Param(init(rngs.params(), (embedding_size, num_classes), jnp.float32))
        self.class_sharding: NamedSharding | None = None

    def __call__(self, embeddings: jax.Array) -> jax.Array:
        _check_embeddings(embeddings, self.embedding_size, "MarginHead")
        x = l2_normalize(embeddings.astype(jnp.float32), axis=1)
        w = self.weight[...].astype(jnp.float32)
        if target_platform() == "tpu":
            # W's columns normalized before the product: scaling after it, the backward pass
            # reduces g·(x @ w) over the global batch for the norms' gradient, a pass over the
            # [B, C / chips] cosines; normalized first, that gradient is a pass over the
            # [E, C / chips] weight. Compiled for v5e-8 (kd_im, teacher forward, bf16,
            # 128/chip, head sharded; the compiler's cycles): 2 M classes 58.2 -> 53.2 ms per
            # step, Glint360K 20.5 -> 19.9, MS1M 14.92 -> 14.95 (benchmarks/TPU_PLAN.md)
            cos = x @ l2_normalize(w, axis=0)
        else:
            # cos θ_c = x·w_c / ||w_c||, the column scaling applied after the product: XLA:CPU
            # fuses a normalized copy of W into the product as a naive loop when no gradient
            # needs that copy (a teacher head: 42 s instead of 0.1 s at 85,742 classes, batch
            # 4). The squared column norms are a product with a row of ones (a GEMV: 4x faster
            # on the CPU than the strided column reduction).
            sq = jnp.ones((1, w.shape[0]), jnp.float32) @ (w * w)
            cos = (x @ w) * jax.lax.rsqrt(jnp.maximum(sq, L2_NORM_EPS * L2_NORM_EPS))
        cos = jnp.clip(cos, -1.0, 1.0)
        if self.class_sharding is not None:
            cos = jax.lax.with_sharding_constraint(cos, self.class_sharding)
        return cos


def padded_class_count(num_classes: int, devices: int) -> int:
    """The class columns a head split over ``devices`` holds: ``num_classes`` rounded up to a
    multiple of ``devices`` (JAX places only evenly divided arrays; 85,742 -> 85,744 on 4)."""
    _check_size("num_classes", num_classes)
    _check_size("devices", devices)
    return -(-num_classes // devices) * devices


def _padded_weight(weight, num_classes: int, columns: int):
    """``weight [E, >= num_classes]`` as ``[E, columns]``: its first ``num_classes`` columns and
    zeros (an abstract ``ShapeDtypeStruct`` of ``nnx.eval_shape`` stays abstract)."""
    if weight.shape[1] == columns:
        return weight
    if isinstance(weight, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((weight.shape[0], columns), weight.dtype)
    kept = weight[:, :num_classes]
    return jnp.pad(kept, ((0, 0), (0, columns - num_classes)))


def shard_margin_heads(module: nnx.Module, mesh: jax.sharding.Mesh, *, axis: str = "data",
                       min_classes: int = 1, variables=nnx.Param):
    """Shards the class axis of every :class:`MarginHead` in ``module`` over ``mesh[axis]``.

    Heads with at least ``min_classes`` classes get ``class_sharding = NamedSharding(mesh,
    P(None, axis))``, so their ``cos_theta [B, C]`` output (and the margin logits and softmax
    computed from it under ``jit``) stays split on the class axis, and their ``weight`` is padded
    with zero columns to :func:`padded_class_count` (``[E, C_pad]``; unchanged when the devices
    divide C). Returns the placement of ``nnx.state(module, variables)`` (by default the
    ``params`` of ``nnx.split(module, nnx.Param, ...)``; ``...`` for the whole state of
    ``nnx.split(module)``): a tree of the same structure whose leaves are ``NamedSharding(mesh,
    P(None, axis))`` for those heads' weights and ``NamedSharding(mesh, P())`` (replicated) for
    everything else. ``jax.device_put(params, shardings)`` places the parameters; an optimizer
    state initialized from them (``optimizer.init(params)``) inherits the placement.

    Raises ValueError if ``axis`` is not a mesh axis.

    Use in a data-parallel step (batch split on ``axis`` as usual)::

        shardings = shard_margin_heads(student, mesh)        # before nnx.split: sets the heads
        graphdef, params, rest = nnx.split(student, nnx.Param, ...)
        params = jax.device_put(params, shardings)
        opt_state = optimizer.init(params)                   # momentum placed like params
        step = jax.jit(train_step, donate_argnums=(0,))      # arguments keep their placement
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {tuple(mesh.axis_names)}, not {axis!r}; pass "
                         f"axis= one of them")
    _check_size("min_classes", min_classes)
    devices = mesh.shape[axis]
    class_sharding = NamedSharding(mesh, PartitionSpec(None, axis))
    sharded_paths = set()
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, MarginHead) or node.num_classes < min_classes:
            continue
        columns = padded_class_count(node.num_classes, devices)
        node.weight = nnx.Param(_padded_weight(node.weight.get_value(), node.num_classes, columns))
        node.class_sharding = class_sharding
        sharded_paths.add(tuple(path) + ("weight",))
    replicated = NamedSharding(mesh, PartitionSpec())

    def placement(key_path, _):
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
                     for k in key_path)
        return class_sharding if keys[:-1] in sharded_paths or keys in sharded_paths else replicated

    return jax.tree_util.tree_map_with_path(placement, nnx.state(module, variables))


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
    ``2 * num_points`` numbers read as ``(x, y)`` per point (Wang et al. 2017 regresses the
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
