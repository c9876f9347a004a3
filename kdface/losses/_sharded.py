"""Batch-global relational losses across devices (data parallelism with ``jax.shard_map``).

A relational loss couples every sample of the batch with every other, so a per-device loss on
the local shard is a different (smaller-batch) loss. Here each device ``all_gather``s the
embeddings, computes only its own rows of the score matrix (its pair rows, angle vertices,
anchors), and the partial sums are ``psum``-ed: the value equals the single-device loss on the
whole batch, and so does the gradient (``all_gather`` transposes to a reduce-scatter).

Two ways in:

* ``rkd_distance_loss_sharded`` & co. are called *inside* ``jax.shard_map`` (e.g. in a
  data-parallel train step) on the local shards ``[N / P, D]`` and return the global scalar,
  identical on every device. Inside ``shard_map``, ``jax.grad`` of it with respect to the local
  shard already is the local slice of the global gradient (do not psum it again); gradients of
  replicated parameters are likewise already summed over devices.
* ``sharded_relational_loss(name, student, teacher, mesh=...)`` wraps one of them in
  ``jax.shard_map`` over a 1-D data mesh for arrays sharded (or to be sharded) along rows.

Rows are split contiguously: device ``d`` holds global rows ``d * N/P .. (d+1) * N/P``, which is
how ``all_gather(tiled=True)`` and ``P('data')`` lay them out.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from kdface.losses import _mmd, _relational
from kdface.losses._checks import check_embeddings, check_option

Array = jax.Array


def _gather(local: Array, axis_name: str) -> tuple[Array, Array, int]:
    """All rows ``[N, D]``, this device's first global row, and the local row count."""
    n_local = local.shape[0]
    full = jax.lax.all_gather(local, axis_name, axis=0, tiled=True)
    return full, jax.lax.axis_index(axis_name) * n_local, n_local


def _psum(axis_name: str) -> Callable[[Array], Array]:
    return functools.partial(jax.lax.psum, axis_name=axis_name)


def _global_pair(student: Array, teacher: Array, axis_name: str, min_n: int
                 ) -> tuple[Array, Array, Array, int]:
    """Checks the local shards, gathers both and centres them; returns (student, teacher,
    row offset, local rows)."""
    student, teacher = _relational.prepare_pair(student, teacher, min_n=1)
    n = student.shape[0] * jax.lax.axis_size(axis_name)
    if n < min_n:
        raise ValueError(f"this loss needs a global batch of at least N={min_n} embeddings, "
                         f"got N={n}")
    s_all, offset, n_local = _gather(student, axis_name)
    t_all, _, _ = _gather(teacher, axis_name)
    return _relational.centered(s_all), _relational.centered(t_all), offset, n_local


def _reduce(partial_sum: Array, count: int, reduction: str, axis_name: str) -> Array:
    check_option("reduction", reduction, ("mean", "sum"))
    total = jax.lax.psum(partial_sum, axis_name)
    return total if reduction == "sum" else total / count


def rkd_distance_loss_sharded(student: Array, teacher: Array, *, axis_name: str = "data",
                              reduction: str = "mean") -> Array:
    """``rkd_distance_loss`` of the global batch, inside ``shard_map``.

    Args: ``student: [N/P, D_s]``, ``teacher: [N/P, D_t]`` local shards; ``reduction`` 'mean' or
    'sum' (over the global ``N(N-1)`` ordered pairs). Returns the global scalar on every device.
    """
    check_option("reduction", reduction, ("mean", "sum"))
    s_all, t_all, offset, n_local = _global_pair(student, teacher, axis_name, 2)
    terms = _relational.rkd_distance_rows(s_all, t_all, offset, n_local, _psum(axis_name))
    n = s_all.shape[0]
    return _reduce(jnp.sum(terms), n * (n - 1), reduction, axis_name)


def rkd_angle_loss_sharded(student: Array, teacher: Array, *, axis_name: str = "data",
                           block_size: int | None = None) -> Array:
    """``rkd_angle_loss`` of the global batch, inside ``shard_map``: each device takes the angle
    vertices of its own rows (tiled as in the single-device loss). The ``[N, N]`` Gram matrices
    are formed on every device from the gathered embeddings (``N^2 D`` flops, small next to the
    ``N^3 / P`` angle work)."""
    s_all, t_all, offset, n_local = _global_pair(student, teacher, axis_name, 3)
    n = s_all.shape[0]
    block = _relational.angle_block_size(n, n_local, block_size)
    gs = _relational.gram(s_all, s_all)
    gt = _relational.gram(t_all, t_all)
    partial_sum = _relational.rkd_angle_sum(gs, gt, offset, n_local, block)
    return _reduce(partial_sum, n * (n - 1) * (n - 2), "mean", axis_name)


def darkrank_hard_loss_sharded(student: Array, teacher: Array, *, axis_name: str = "data",
                               alpha: float = 3.0, beta: float = 3.0,
                               list_length: int | None = None, reduction: str = "mean"
                               ) -> Array:
    """``darkrank_hard_loss`` of the global batch, inside ``shard_map``: each device ranks the
    whole batch for its own anchors; ``reduction`` 'mean' or 'sum' over the ``N`` anchors."""
    _relational.check_darkrank_options(alpha, beta, list_length)
    check_option("reduction", reduction, ("mean", "sum"))
    s_all, t_all, offset, n_local = _global_pair(student, teacher, axis_name, 2)
    per_anchor = _relational.darkrank_rows(s_all, t_all, offset, n_local, alpha=alpha,
                                           beta=beta, list_length=list_length)
    return _reduce(jnp.sum(per_anchor), s_all.shape[0], reduction, axis_name)


def mk_mmd_sharded(x: Array, y: Array, *, axis_name: str = "data",
                   multipliers: Sequence[float] = (1, 2, 4, 8, 16), normalize: bool = True,
                   estimator: str = "biased") -> Array:
    """``mk_mmd`` of the global batch, inside ``shard_map``; ``x: [N/P, D]``, ``y: [M/P, D]``.

    The bandwidth ``sigma^2`` is the global one (from the gathered pooled sample), so the value
    equals the single-device ``mk_mmd`` on the whole batch. The linear estimator pairs global
    rows ``(2i, 2i+1)``, so it needs an even number of rows per device.
    """
    check_embeddings("x", x)
    check_embeddings("y", y)
    n_dev = jax.lax.axis_size(axis_name)
    x_all, x_offset, n_x = _gather(x, axis_name)
    y_all, y_offset, n_y = _gather(y, axis_name)
    _mmd.check_mmd_args(x_all, y_all, multipliers, estimator)
    if estimator == "linear" and n_x % 2:
        raise ValueError(f"the sharded linear estimator needs an even number of rows per "
                         f"device, got {n_x} (N={n_x * n_dev} over {n_dev} devices)")
    x_all, y_all = _mmd.prepare_features(x_all, y_all, normalize)
    coefs = _mmd.kernel_coefficients(_mmd.pooled_mean_sq_distance(x_all, y_all), multipliers)
    n, m = x_all.shape[0], y_all.shape[0]
    if estimator == "linear":
        x_rows = jax.lax.dynamic_slice_in_dim(x_all, x_offset, n_x, axis=0)
        y_rows = jax.lax.dynamic_slice_in_dim(y_all, y_offset, n_y, axis=0)
        return jax.lax.psum(_mmd.linear_sum(x_rows, y_rows, coefs), axis_name) / (n // 2)
    center = jax.lax.stop_gradient(jnp.mean(jnp.concatenate([x_all, y_all], axis=0), axis=0,
                                            keepdims=True))
    unbiased = estimator == "unbiased"
    sums = _mmd.quadratic_sums(x_all - center, y_all - center, coefs, x_offset, n_x, y_offset,
                               n_y, include_self=not unbiased)
    s_xx, s_yy, s_xy = (jax.lax.psum(s, axis_name) for s in sums)
    return _mmd.combine_quadratic(s_xx, s_yy, s_xy, n, m, unbiased)


SHARDED_LOSSES: dict[str, Callable[..., Array]] = {
    "rkd_distance": rkd_distance_loss_sharded,
    "rkd_angle": rkd_angle_loss_sharded,
    "darkrank_hard": darkrank_hard_loss_sharded,
    "mk_mmd": mk_mmd_sharded,
}


def sharded_relational_loss(loss_name: str, student: Array, teacher: Array, *, mesh: Mesh,
                            axis_name: str = "data", **options) -> Array:
    """Global-batch relational loss of row-sharded ``student: [N, D_s]``, ``teacher: [N, D_t]``
    (``[M, D]`` for ``mk_mmd``'s ``y``) over ``mesh``'s ``axis_name``.

    ``loss_name`` is one of ``SHARDED_LOSSES`` (``'rkd_distance'``, ``'rkd_angle'``,
    ``'darkrank_hard'``, ``'mk_mmd'``); ``options`` are that loss's keyword options. ``N`` must
    be divisible by the axis size. Equal in value and gradient to the single-device loss.
    Build the mesh with ``jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,))``.
    """
    check_option("loss_name", loss_name, tuple(SHARDED_LOSSES))
    n_dev = mesh.shape[axis_name]
    for name, arr in (("student", student), ("teacher", teacher)):
        if jnp.ndim(arr) >= 1 and arr.shape[0] % n_dev:
            raise ValueError(f"{name} has N={arr.shape[0]} rows, not divisible by the "
                             f"{n_dev} devices of mesh axis {axis_name!r}")
    fn = functools.partial(SHARDED_LOSSES[loss_name], axis_name=axis_name, **options)
    spec = PartitionSpec(axis_name)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec), out_specs=PartitionSpec())(
        student, teacher)
