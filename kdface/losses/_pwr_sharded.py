"""PWR of the global batch across devices (Nikitin et al. 2020 eq. 3), called inside shard_map.

PWR couples every score pair of the whole batch, so a per-device PWR of the local shard would be
a different (smaller-batch) loss. Here each device ``all_gather``s the embeddings, forms all M
scores (N^2 D flops, small next to the M^2 comparisons), computes *its own share* of the
comparisons, and the partial sums are ``psum``-ed; the count of teacher-ordered pairs (teacher
only, O(M log M)) is computed from the gathered scores on every device. Value and gradient equal
the single-device ``pwr_loss`` on the whole batch: ``all_gather`` transposes to a reduce-scatter,
so ``jax.grad`` inside ``shard_map`` with respect to the local shard already is the local slice
of the global gradient (do not psum it again).

Shares: ``dense`` — contiguous rows a of the [M, M] comparison matrix; ``tiled`` — the lower
tiles dealt round-robin (balanced); ``sorted`` — the pairs whose higher-ranked score a falls in
the device's contiguous range of scores. The sorted sweep itself is O(M log M) and is run in full
on every device (only the final reduction is shared), so it does not get faster with devices;
it is still far cheaper than the others' M^2 / P.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdface.losses import _pwr, _pwr_common, _pwr_sorted, _pwr_tiled
from kdface.losses._checks import check_embeddings, check_same_rows, compute_dtype
from kdface.losses._pwr_common import Inversion

Array = jax.Array


def dense_rows_sum(t: Array, x: Array, y: Array, inversion: Inversion, index: Array,
                   n_shares: int, tie_tolerance: float = 0.0) -> Array:
    """Sum of ``l(x_b - y_a)`` over the share ``index`` of ``n_shares`` contiguous row ranges a
    of the dense [M, M] comparison matrix, ordered pairs t_b < t_a - tie_tolerance only."""
    m = t.shape[0]
    per = -(-m // n_shares)
    pad = per * n_shares - m   # padding rows (t = NaN) are ordered against nothing
    t_rows = jax.lax.dynamic_slice(jnp.pad(t, (0, pad), constant_values=np.nan),
                                   (index * per,), (per,))
    y_rows = jax.lax.dynamic_slice(jnp.pad(y, (0, pad)), (index * per,), (per,))
    ordered = t[None, :] < _pwr_common.tie_thresholds(t_rows, tie_tolerance)[:, None]
    return jnp.sum(jnp.where(ordered, inversion.penalty(x[None, :] - y_rows[:, None]), 0.0))


def pwr_loss_sharded(student: Array, teacher: Array, *, axis_name: str = "data",
                     relation: str = "cosine", inversion: str = "exp",
                     margin: str = "teacher_diff", margin_value: float = 0.0,
                     power: float = 1.0, beta: float = 1.0, method: str = "auto",
                     tie_tolerance: float = 0.0) -> Array:
    """``pwr_loss`` (Nikitin et al. 2020 eqs. 3-11) of the global batch, inside ``jax.shard_map``.

    Args:
      student: ``[N / P, D_s]`` this device's rows of the student embeddings (global rows
        ``d * N/P ..`` on device d, the layout of ``all_gather(tiled=True)`` / ``P('data')``).
      teacher: ``[N / P, D_t]`` the matching teacher rows (frozen; no gradient).
      axis_name: the mesh axis the batch is split over.
      relation, inversion, margin, margin_value, power, beta, method, tie_tolerance: as in
        ``pwr_loss``; ``method='auto'`` picks for the global N. Pairs are counted in the
        inputs' dtype (float64 with x64 on), as the sums are.

    Returns:
      The global scalar loss, identical on every device.
    """
    check_embeddings("student", student)
    check_embeddings("teacher", teacher)
    check_same_rows("student", student, "teacher", teacher)
    _pwr.check_pwr_options(relation, inversion, margin, margin_value, power, beta, method)
    _pwr_common.check_tie_tolerance(tie_tolerance)
    n_dev = jax.lax.axis_size(axis_name)
    n = student.shape[0] * n_dev
    if n < 2:
        raise ValueError(f"pwr_loss needs a global batch of at least N=2 embeddings, got N={n}")
    m = n * (n - 1) // 2
    inv = Inversion(inversion, float(power), float(beta))
    bound = _pwr_common.value_range_bound(relation, margin, margin_value)
    concrete = _pwr.resolve_method(method, m, inv, bound)
    dtype = compute_dtype(student, teacher)
    gather = lambda e: jax.lax.all_gather(e.astype(dtype), axis_name, axis=0, tiled=True)  # noqa
    s = _pwr.pairwise_scores(gather(student), relation=relation)
    t = jax.lax.stop_gradient(_pwr.pairwise_scores(gather(teacher), relation=relation))
    x, y = _pwr.pair_values(s, t, margin, margin_value)
    device = jax.lax.axis_index(axis_name)
    per = -(-m // n_dev)
    idx = jnp.arange(m, dtype=jnp.int32)
    mine = (idx >= device * per) & (idx < (device + 1) * per)   # this device's scores a
    if concrete == "dense":
        partial = dense_rows_sum(t, x, y, inv, device, n_dev, tie_tolerance)
    elif concrete == "tiled":
        partial = _pwr_tiled.tiled_pair_sum(t, x, y, inv, bound, share=(device, n_dev),
                                            tie_tolerance=tie_tolerance)[0]
    else:
        partial = _pwr_sorted.sorted_pair_sum(t, x, y, inv, query_mask=mine,
                                              tie_tolerance=tie_tolerance)[0]
    # The count's share: the ordered pairs in this device's rows a (teacher only).
    count = _pwr_common.sum_counts(
        jnp.where(mine, _pwr_common.lower_ranks(t, tie_tolerance), 0), t.dtype)
    total, count = jax.lax.psum((partial, count), axis_name)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0).astype(dtype)
