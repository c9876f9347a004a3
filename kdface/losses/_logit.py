"""Logit-level distillation: Hinton's soft targets and the hard (label) loss.

Two forms of the soft loss appear in the papers and are kept apart here:

* ``soft_prediction_loss``: the cross-entropy ``H(softmax(t/τ), softmax(s/τ))`` written by
  Wang et al. 2019 eq. (3) and Wang et al. 2017 eq. (2) (second term), with no τ² factor.
* ``hinton_kd_loss``: ``τ² KL(softmax(t/τ) || softmax(s/τ))``, Hinton et al.'s form with the τ²
  gradient rescaling, used as "HKD" with τ = 4 by Nikitin et al. 2020 eq. (12).

The two differ by τ² and by the teacher entropy ``H(softmax(t/τ))``, which is constant with
respect to the student, so their student gradients differ only by the factor τ².
Teacher logits are frozen inputs: both apply ``stop_gradient`` to them.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kdface._math import constant_shift
from kdface._platform import target_platform
from kdface.losses._checks import (check_float, check_option, check_positive, check_rank,
                                   check_same_shape, compute_dtype)
from kdface.losses._classification import REDUCTIONS, apply_reduction


def _checked_logits(student_logits: Any, teacher_logits: Any, temperature: float,
                    reduction: Any) -> tuple[jax.Array, jax.Array]:
    """Checks the arguments; returns both logits in the compute dtype, the teacher's under
    ``stop_gradient``."""
    check_float("student_logits", student_logits)
    check_float("teacher_logits", teacher_logits)
    check_rank("student_logits", student_logits, 2, "[N, C]")
    check_rank("teacher_logits", teacher_logits, 2, "[N, C]")
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_positive("temperature", temperature)
    check_option("reduction", reduction, REDUCTIONS)
    dtype = compute_dtype(student_logits, teacher_logits)
    return student_logits.astype(dtype), jax.lax.stop_gradient(teacher_logits).astype(dtype)


# On the CPU the row statistics are reduced over blocks of rows of about this many logits (128
# KiB per input in float32), so their two passes (maxima, then the exponential sums) read each
# block from a core's L2 cache instead of streaming the whole [N, C] arrays from memory twice.
# Measured (value and gradient, C = 2048, one core): N = 1024 took 30 ms without blocks.
SOFT_ROW_BLOCK_ELEMENTS = 1 << 15


def _soft_row_stats(student: jax.Array, teacher: jax.Array, temperature: float,
                    bound: float | None = None, *, entropy: bool = False
                    ) -> tuple[jax.Array, ...]:
    """Per row of ``[R, C]`` logits: ``(lse_s, lse_t, cross)`` with ``lse`` the log-sum-exp of
    ``logits / τ`` and ``cross = Σ_c p_t,c (t_c - s_c) / τ``, so that ``KL(p_t || p_s) = cross -
    lse_t + lse_s``; with ``entropy`` also ``mean_t = Σ_c p_t,c t_c / τ``, so that ``H(p_t, p_s)
    = cross + lse_s - mean_t``. Two passes over the block: maxima, then sums; one, the sums, with
    a ``bound`` on both logits (``kdface._math.logsumexp``: a constant shift for the maxima)."""
    zs, zt = student / temperature, teacher / temperature
    shift = constant_shift(None if bound is None else bound / temperature, zs.shape[-1],
                           zs.dtype)
    if shift is None:
        ms = jax.lax.stop_gradient(jnp.max(zs, axis=-1, keepdims=True))
        mt = jax.lax.stop_gradient(jnp.max(zt, axis=-1, keepdims=True))
    else:
        ms = mt = jnp.full((zs.shape[0], 1), shift, zs.dtype)
    et = jnp.exp(zt - mt)
    sum_t = jnp.sum(et, axis=-1)
    lse_s = ms[:, 0] + jnp.log(jnp.sum(jnp.exp(zs - ms), axis=-1))
    lse_t = mt[:, 0] + jnp.log(sum_t)
    stats = (lse_s, lse_t, jnp.sum(et * (zt - zs), axis=-1) / sum_t)
    return stats + (jnp.sum(et * zt, axis=-1) / sum_t,) if entropy else stats


def _soft_rows(student: jax.Array, teacher: jax.Array, temperature: float,
               bound: float | None, entropy: bool, with_p_diff: bool = False):
    """``_soft_row_stats`` over the CPU's row blocks; with ``with_p_diff`` also ``p_s - p_t``
    ``[N, C]`` (the softmaxes from the saved row log-sum-exps), both derivatives' factor."""
    stats = _row_blocked(lambda s, t: _soft_row_stats(s, t, temperature, bound,
                                                      entropy=entropy), student, teacher)
    if not with_p_diff:
        return stats
    lse_s, lse_t = stats[0], stats[1]
    return stats, (jnp.exp(student / temperature - lse_s[:, None])
                   - jnp.exp(teacher / temperature - lse_t[:, None]))


def _row_blocked(fn: Callable[..., tuple[jax.Array, ...]], student: jax.Array,
                 teacher: jax.Array) -> tuple[jax.Array, ...]:
    """``fn`` (``[R, C]`` pair -> tuple of ``[R]``) over blocks of rows on the CPU, whole arrays
    elsewhere (accelerators fuse the row reductions into one kernel). The last block starts at
    ``N - rows`` and recomputes a few rows, so no [N, C] input is padded or copied."""
    n, c = student.shape
    rows = min(n, max(1, SOFT_ROW_BLOCK_ELEMENTS // c))
    if target_platform() != "cpu" or rows == n:
        return fn(student, teacher)

    def block(i: jax.Array, outs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        start = jnp.minimum(i * rows, n - rows)
        got = fn(jax.lax.dynamic_slice_in_dim(student, start, rows),
                 jax.lax.dynamic_slice_in_dim(teacher, start, rows))
        return tuple(jax.lax.dynamic_update_slice_in_dim(o, g, start, 0)
                     for o, g in zip(outs, got))

    outs = tuple(jnp.zeros((n,), student.dtype)
                 for _ in jax.eval_shape(fn, student[:rows], teacher[:rows]))
    return jax.lax.fori_loop(0, -(-n // rows), block, outs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def hinton_kd_rows(student: jax.Array, teacher: jax.Array, temperature: float,
                   bound: float | None = None) -> jax.Array:
    """``[N]`` per-example ``τ² KL(p_t || p_s)`` from ``[N, C]`` logits (already in the compute
    dtype), from two row passes (``_soft_row_stats``) without forming ``log p`` arrays.

    Its derivative is written out instead of left to autodiff: with ``p = softmax(logits / τ)``,
    ``d KL / d s = (p_s - p_t) / τ``, so the tangent of row n is ``τ Σ_c (p_s - p_t)_c ds_c``;
    reverse mode transposes it into one elementwise pass ``τ g_n (p_s - p_t)`` (two exponentials
    of the inputs with the saved row log-sum-exps), where autodiff of the log-softmax formulation
    kept and re-read ``[N, C]`` intermediates. ``teacher`` is the frozen target: no tangent
    flows from it (callers put it under ``stop_gradient``). With a ``bound`` on both logits the
    maxima pass is skipped (``_soft_row_stats``).
    """
    lse_s, lse_t, cross = _soft_rows(student, teacher, temperature, bound, entropy=False)
    return temperature ** 2 * (cross - lse_t + lse_s)


@hinton_kd_rows.defjvp
def _hinton_kd_rows_jvp(temperature: float, bound: float | None, primals: tuple,
                        tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (lse_s, lse_t, cross), p_diff = _soft_rows(*primals, temperature, bound, entropy=False,
                                               with_p_diff=True)
    value = temperature ** 2 * (cross - lse_t + lse_s)
    return value, temperature * jnp.sum(p_diff * tangents[0], axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def soft_prediction_rows(student: jax.Array, teacher: jax.Array, temperature: float,
                         bound: float | None = None) -> jax.Array:
    """``[N]`` per-example ``H(p_t, p_s) = -Σ_c p_t,c log p_s,c`` from ``[N, C]`` logits (in the
    compute dtype), from the row statistics of ``hinton_kd_rows`` (``cross + lse_s - mean_t``),
    one pass over the logits with a ``bound`` on them, two without.

    Its derivative is written out like Hinton's: ``d H / d s = (p_s - p_t) / τ``, so reverse mode
    is one elementwise pass ``g_n (p_s - p_t) / τ``, where autodiff of ``-Σ exp(log p_t) log
    p_s`` re-reduced the rows (``Σ_c p_t,c``) and kept ``[N, C]`` log-softmaxes. ``teacher`` is
    the frozen target: no tangent flows from it.
    """
    lse_s, _, cross, mean_t = _soft_rows(student, teacher, temperature, bound, entropy=True)
    return cross + lse_s - mean_t


@soft_prediction_rows.defjvp
def _soft_prediction_rows_jvp(temperature: float, bound: float | None, primals: tuple,
                              tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (lse_s, _, cross, mean_t), p_diff = _soft_rows(*primals, temperature, bound, entropy=True,
                                                   with_p_diff=True)
    return cross + lse_s - mean_t, jnp.sum(p_diff * tangents[0], axis=-1) / temperature


def hinton_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float,
                   reduction: str | None = "mean",
                   logit_bound: float | None = None) -> jax.Array:
    """Hinton KD ``τ² KL(p_t || p_s)`` with ``p = softmax(logits / τ)``.

    Nikitin et al. 2020 eq. (12), the HKD term (τ = 4 there); the same soft targets as Wang et al.
    2019 eq. (3). Returns the KL divergence, not the cross-entropy: it is 0 when the student matches
    the teacher, and differs from ``τ² H(p_t, p_s)`` by the teacher entropy ``τ² H(p_t)``, a
    constant for the student (see ``soft_prediction_loss`` for the cross-entropy form). The τ²
    factor keeps the soft-target gradients on the scale of the hard loss as τ changes.
    ``teacher_logits`` get ``stop_gradient``.

    Args:
      student_logits: ``[N, C]`` float.
      teacher_logits: ``[N, C]`` float.
      temperature: τ > 0.
      reduction: ``'mean'`` over the batch (default), ``'sum'``, or ``None``/``'none'``.
      logit_bound: as for ``soft_prediction_loss``: a bound on both logits, the softmaxes then
        need no pass for the row maxima. The same loss.

    Returns:
      scalar, or ``[N]`` per-example values.

    >>> import jax.numpy as jnp
    >>> float(hinton_kd_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=4.0))
    0.0
    """
    student, teacher = _checked_logits(student_logits, teacher_logits, temperature, reduction)
    return apply_reduction(hinton_kd_rows(student, teacher, float(temperature), None if (
        logit_bound is None) else float(logit_bound)), reduction)


def soft_prediction_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
                         temperature: float, reduction: str | None = "mean",
                         logit_bound: float | None = None) -> jax.Array:
    """Cross-entropy between soft predictions ``H(p_t, p_s) = -Σ_c p_t,c log p_s,c``.

    ``p = softmax(logits / τ)``. Wang et al. 2019 eq. (3) ("the soft loss is the cross entropy
    between X_T^τ and X_S^τ") and Wang et al. 2017 eqs. (1)-(2), whose second term is the
    cross-entropy between the teacher's and student's soft predictions. Neither writes a τ²
    factor, so none is applied (compare ``hinton_kd_loss``). The value includes the teacher
    entropy, so it is not 0 when the student matches the teacher. ``teacher_logits`` get
    ``stop_gradient``.

    Args:
      student_logits: ``[N, C]`` float.
      teacher_logits: ``[N, C]`` float.
      temperature: τ > 0 (the papers tune it by cross-validation; no value survives in them).
      reduction: ``'mean'`` over the batch (default), ``'sum'``, or ``None``/``'none'``.
      logit_bound: where known, a bound ``B`` on both logits (none above ``B``, each row's
        largest at least ``-B``: ``s·cos θ`` logits of margin heads of scale ``s``); the
        softmaxes then need no pass for the row maxima (``kdface._math.logsumexp``). The same
        loss.

    Returns:
      scalar, or ``[N]`` per-example values.
    """
    student, teacher = _checked_logits(student_logits, teacher_logits, temperature, reduction)
    per_example = soft_prediction_rows(student, teacher, float(temperature),
                                       None if logit_bound is None else float(logit_bound))
    return apply_reduction(per_example, reduction)
