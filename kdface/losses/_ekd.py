"""EKD, evaluation-oriented knowledge distillation: the student learns the teacher's *rank* of each
pair against the verification thresholds that decide TPR@FPR.

Per batch (Huang et al. 2022, the evaluation-oriented rank loss, as the official code computes
it; equation numbers are not cited here because this module was written from the official code
and its description, not checked against the paper's numbering):

1. cosine similarities of all unordered pairs ``i < j`` of the L2-normalized student and teacher
   embeddings, split into positive (same label) and negative pairs;
2. thresholds at the FPR anchors ``1e-1 .. 1e-6`` from the descending-sorted *negative*
   similarities, for student and teacher separately, kept as running averages across steps
   (momentum 0.01): the state ``EkdState`` goes in and comes out, nothing is hidden;
3. each pair's soft count of the anchors it exceeds, ``sum_k sigmoid((sim - anchor_k) / T)`` with
   T = 0.01 (the paper's "rank" of the pair);
4. the mean squared difference of student and teacher counts over all positive pairs, and over
   the 2,000 negative pairs the *student* finds hardest (highest similarity); weights 0.02 and
   0.01.

The constants are those of the official code (Tencent/TFace, ``recognition/tasks/ekd``), each
labelled where it is defined below. The thresholds and the teacher side carry no gradient (the
official code computes them under ``torch.no_grad``); the student gets gradient through its
similarities on both terms.

Fast form: similarities come from one Gram matrix; the positive term is one fused masked pass
over the ``[N, N]`` matrix; nothing is fully sorted. The hard negatives and the shallow
thresholds come from one ``top_k`` of the ``P = N(N-1)/2`` pair similarities (the teacher's
from a second, values only); a deep threshold (FPR 1e-1 is rank ``L / 10``) is selected exactly
from a bracket that a strided sample of the pairs places around it (``_select_rank``).

References:
  Huang, Y., Wu, J., Xu, X., Ding, S. Evaluation-oriented Knowledge Distillation for Deep Face
  Recognition. CVPR 2022. https://arxiv.org/abs/2206.02325
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kdface._math import l2_normalize
from kdface.losses._checks import (check_embeddings, check_labels, check_positive,
                                   check_same_rows, compute_dtype)

Array = jax.Array

# The FPR anchors as 1 / FPR: TFace ``ekd.py``, ``self.anchor = [10, 100, ..., 1000000]``
# (FPR 1e-1 .. 1e-6, the paper's evaluation points). Integers, because the threshold of anchor a
# is the negative at 0-based descending rank ``L // a`` (L negatives), integer division as in
# TFace; ``floor(L * 1e-1)`` in floating point would pick another rank when L * 0.1 rounds down.
INVERSE_FPR = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
# Running-average momentum of the thresholds: TFace ``ekd.py``, ``self.momentum = 0.01``
# (``anchor <- 0.01 * batch + 0.99 * anchor``).
MOMENTUM = 0.01
# Sigmoid temperature of the soft anchor count: TFace ``ekd.py``, ``self.t = 0.01``.
TEMPERATURE = 0.01
# The exponent of the sigmoid is clamped to [-50, 50] "for stability": TFace ``ekd.py``,
# ``torch.clamp(exponent, min=-50, max=50)``; beyond it the count is constant (no gradient).
EXPONENT_CLAMP = 50.0
# Hard negatives, the student's most similar negative pairs: TFace ``ekd.py``, ``self.topk = 2000``.
TOP_NEGATIVES = 2000
# Term weights: TFace ``ekd.py``, ``loss = s_pos_kd_loss * 0.02 + s_neg_kd_loss * 0.01``.
POSITIVE_WEIGHT = 0.02
NEGATIVE_WEIGHT = 0.01
HIGHEST = jax.lax.Precision.HIGHEST
# The largest batch: pair indices and (r + 1)(r + 2) stay within int32.
MAX_ROWS = 46_340
# How the thresholds are found (speed only; the values are exact either way): anchors of rank
# below DIRECT_RANKS come from one top_k shared with the hard negatives; deeper ones (FPR 1e-1 at
# N >= ~400) from a sample of every SAMPLE_STRIDE-th pair and a bracket of SAMPLE_SIGMAS binomial
# deviations around the estimate (``_select_rank``).
DIRECT_RANKS = 8192
SAMPLE_STRIDE = 16
SAMPLE_SIGMAS = 4.0


class EkdState(NamedTuple):
    """The running thresholds EKD carries from step to step (no gradient flows into them).

    student: ``[K]`` float, one per FPR anchor (``inverse_fpr`` order), on the student's
      similarities; teacher: ``[K]`` the same on the teacher's.
    """

    student: Array
    teacher: Array


def ekd_init_state(num_anchors: int = len(INVERSE_FPR), dtype: Any = jnp.float32) -> EkdState:
    """The state before the first step: all thresholds 0, TFace's ``register_buffer(zeros)``.

    With momentum m the first step's thresholds are therefore ``m * batch_thresholds`` and the
    k-th step's are biased towards 0 by the factor ``1 - (1 - m)^k`` (no bias correction, as in
    TFace). To start from the first batch's thresholds instead, build the state from
    ``ekd_batch_thresholds`` (``EkdState(*ekd_batch_thresholds(...)[:2])``).

    Returns: ``EkdState`` of two ``[num_anchors]`` zero arrays.
    """
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 1:
        raise ValueError(f"num_anchors must be a positive int, got {num_anchors!r}")
    zeros = jnp.zeros((num_anchors,), dtype)
    return EkdState(zeros, zeros)


def _check_inverse_fpr(inverse_fpr: Sequence[int]) -> tuple[int, ...]:
    if isinstance(inverse_fpr, (str, bytes)) or not isinstance(inverse_fpr, Sequence):
        raise TypeError(f"inverse_fpr must be a sequence of ints, got {inverse_fpr!r}")
    values = tuple(inverse_fpr)
    if not values or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 1
                             for a in values):
        raise ValueError(f"inverse_fpr must be a non-empty sequence of ints >= 1 (1 / FPR), "
                         f"got {inverse_fpr!r}")
    return values


def _check_inputs(student: Any, teacher: Any, labels: Any) -> None:
    check_embeddings("student", student, min_n=2)
    if student.shape[0] > MAX_ROWS:
        raise ValueError(f"EKD takes at most N={MAX_ROWS} rows (int32 pair indices), "
                         f"got N={student.shape[0]}")
    check_embeddings("teacher", teacher, min_n=2)
    check_same_rows("student", student, "teacher", teacher)
    check_labels("labels", labels, student.shape[0])


def _check_state(state: Any, k: int) -> EkdState:
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"state must be an EkdState (student, teacher thresholds), got "
                        f"{type(state).__name__}")
    for name, x in zip(("state.student", "state.teacher"), state):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{name} must be a float array, got {dtype}")
        if tuple(x.shape) != (k,):
            raise ValueError(f"{name} must have shape [K]=[{k}] (one per FPR anchor), "
                             f"got {tuple(x.shape)}")
    return EkdState(*state)


def _similarities(e: Array) -> Array:
    """``[N, N]`` cosines of the L2-normalized rows (``F.normalize`` then ``e @ e.T``)."""
    u = l2_normalize(e)
    return jnp.matmul(u, u.T, precision=HIGHEST)


def _pair_position(p: Array, n: int) -> tuple[Array, Array]:
    """Row ``i`` and column ``j`` of pair index ``p`` (int32, any shape) among the pairs
    ``i < j`` of ``n`` rows in row-major order.

    Counted from the last pair, ``q = P - 1 - p`` lies in the ``r``-th row from the end with
    ``r (r + 1) / 2 <= q < (r + 1)(r + 2) / 2``: ``r = floor((sqrt(8q + 1) - 1) / 2)``. That
    root has no cancellation, so float32 gives r to within one for every ``n <= MAX_ROWS``,
    and one integer step each way makes it exact.
    """
    q = (n * (n - 1) // 2 - 1) - p
    r = jnp.floor((jnp.sqrt(8.0 * q.astype(jnp.float32) + 1.0) - 1.0) / 2.0).astype(jnp.int32)
    r = jnp.clip(r, 0, n - 2)

    def tri(x):
        return x * (x + 1) // 2

    r = jnp.where(tri(r + 1) <= q, r + 1, r)
    r = jnp.where(tri(r) > q, r - 1, r)
    return n - 2 - r, n - 1 - (q - tri(r))


def _upper_pairs(n: int) -> tuple[Array, Array]:
    """Row and column ``[P]`` of the ``P = n(n-1)/2`` pairs ``i < j`` in row-major order,
    computed in the graph (no ``[P]`` constant is embedded in the program)."""
    return _pair_position(jnp.arange(n * (n - 1) // 2, dtype=jnp.int32), n)


def _clamped_exponent(sim: Array, anchor: Array, temperature: float) -> tuple[Array, Array]:
    """``clamp(-(sim - A) / T, -50, 50)`` (TFace) and where the clamp is inactive."""
    exponent = -(sim - anchor) / temperature
    inside = (exponent >= -EXPONENT_CLAMP) & (exponent <= EXPONENT_CLAMP)
    return jnp.clip(exponent, -EXPONENT_CLAMP, EXPONENT_CLAMP), inside


def _count(sim: Array, anchors: Array, temperature: float) -> Array:
    """``sum_k 1 / (1 + exp(z_k))`` over the anchors, ``z_k`` the clamped exponent."""
    count = jnp.zeros_like(sim)
    for k in range(anchors.shape[0]):
        z = _clamped_exponent(sim, anchors[k], temperature)[0]
        count = count + 1.0 / (1.0 + jnp.exp(z))
    return count


def _slope(sim: Array, anchors: Array, temperature: float) -> Array:
    """``d _count / d sim = sum_k u_k / (1 + u_k)^2 / T`` with ``u_k = exp(-z_k)`` (the same
    value as ``e^z / (1 + e^z)^2``, accurate in both tails), 0 where the clamp is active (as
    ``torch.clamp``'s gradient).

    ``exp(-z)`` where ``_count`` has ``exp(z)``: sharing one exponential, XLA:CPU stored an
    ``[N, N]`` intermediate per anchor and the backward pass cost five times the forward."""
    slope = jnp.zeros_like(sim)
    for k in range(anchors.shape[0]):
        z, inside = _clamped_exponent(sim, anchors[k], temperature)
        u = jnp.exp(-z)
        slope = slope + jnp.where(inside, u / ((1.0 + u) * (1.0 + u) * temperature), 0.0)
    return slope


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _soft_count(sim: Array, anchors: Array, temperature: float) -> Array:
    """``sum_k sigmoid((sim - anchor_k) / T)`` with TFace's clamped exponent; ``sim: [...]``.

    Its derivative is written out (``_slope``, a ``custom_jvp``): autodiff of the six clamped
    sigmoids over ``[N, N]`` stored every intermediate and cost five times the forward pass on
    the CPU. ``ekd_loss`` stops the anchors' gradient; a tangent given for them is honoured."""
    return _count(sim, anchors, temperature)


@functools.partial(_soft_count.defjvp, symbolic_zeros=True)
def _soft_count_jvp(temperature, primals, tangents):
    sim, anchors = primals
    d_sim, d_anchors = tangents
    count = _count(sim, anchors, temperature)
    out = (jnp.zeros_like(count) if isinstance(d_sim, jax.custom_derivatives.SymbolicZero)
           else _slope(sim, anchors, temperature) * d_sim)
    if not isinstance(d_anchors, jax.custom_derivatives.SymbolicZero):
        # d/dA_k of sigmoid((x - A_k) / T) is minus its slope in x
        for k in range(anchors.shape[0]):
            out = out - _slope(sim, anchors[k:k + 1], temperature) * d_anchors[k]
    return count, out


def _negative_keys(s_sim: Array, t_sim: Array, labels: Array
                   ) -> tuple[Array, Array, Array, Array]:
    """``[P]`` student and teacher similarities of the pairs ``i < j``, ``-inf`` on positive
    pairs (no gradient), their flat ``[N*N]`` indices, and the number of negatives L."""
    labels = jnp.asarray(labels)
    n = labels.shape[0]
    rows, cols = _upper_pairs(n)
    negative = labels[rows] != labels[cols]
    flat = rows * n + cols
    neg_inf = jnp.asarray(-jnp.inf, s_sim.dtype)
    s_keys = jnp.where(negative, jax.lax.stop_gradient(s_sim).reshape(-1)[flat], neg_inf)
    t_keys = jnp.where(negative, jax.lax.stop_gradient(t_sim).reshape(-1)[flat], neg_inf)
    return s_keys, t_keys, flat, jnp.sum(negative, dtype=jnp.int32)


def _direct_size(pairs: int, inverse_fpr: tuple[int, ...], top_negatives: int) -> int:
    """Entries of the one ``top_k`` that serves the hard negatives and every anchor whose rank
    ``L // a`` stays below ``DIRECT_RANKS``; deeper anchors are selected by ``_select_rank``."""
    shallow = [pairs // a + 1 for a in inverse_fpr if pairs // a < DIRECT_RANKS]
    return min(pairs, max([top_negatives, *shallow]))


def _select_rank(keys: Array, count: Array, rank: Array, max_rank: int) -> Array:
    """The element of descending rank ``rank`` (0-based, < ``count``) of ``keys: [P]`` (``count``
    finite entries, the rest ``-inf``), exactly, without sorting the ``max_rank + 1`` top.

    A strided sample (every ``SAMPLE_STRIDE``-th key) estimates the value at that rank; a
    bracket of +-``SAMPLE_SIGMAS`` binomial deviations around it is counted in one pass: if the
    rank falls inside the bracket and the bracket holds at most ``cap`` keys, the answer is the
    right one of the bracket's keys (a ``top_k`` of size ``cap``); otherwise (an unlucky sample,
    heavy ties) the full ``top_k`` of ``max_rank + 1`` keys answers. Both give the same value.
    """
    pairs = keys.shape[0]
    sample = keys[::SAMPLE_STRIDE]
    m = sample.shape[0]
    fraction = (max_rank + 1) / pairs
    width = int(math.ceil(SAMPLE_SIGMAS * math.sqrt(m * fraction) + 2))
    k_sample = min(m, int(math.ceil(m * fraction)) + 2 * width + 1)
    cap = min(pairs, 4 * width * SAMPLE_STRIDE + 1024)
    top_sample = jax.lax.top_k(sample, k_sample)[0]
    in_sample = jnp.sum(jnp.isfinite(sample), dtype=jnp.int32)
    estimate = rank.astype(jnp.float32) * in_sample.astype(jnp.float32) / jnp.maximum(
        count, 1).astype(jnp.float32)
    lo_rank = jnp.floor(estimate).astype(jnp.int32) - width
    hi_rank = jnp.ceil(estimate).astype(jnp.int32) + width
    inf = jnp.asarray(jnp.inf, keys.dtype)
    upper = jnp.where(lo_rank < 0, inf, jnp.take(top_sample, jnp.maximum(lo_rank, 0),
                                                  mode="clip"))
    lower = jnp.where(hi_rank >= jnp.minimum(in_sample, k_sample), -inf,
                      jnp.take(top_sample, hi_rank, mode="clip"))
    above = jnp.sum(keys > upper, dtype=jnp.int32)
    bracket = (keys <= upper) & (keys >= lower) & jnp.isfinite(keys)
    inside = jnp.sum(bracket, dtype=jnp.int32)
    ok = (above <= rank) & (rank < above + inside) & (inside <= cap)

    def from_bracket(_):
        top = jax.lax.top_k(jnp.where(bracket, keys, -inf), cap)[0]
        return jnp.take(top, jnp.clip(rank - above, 0, cap - 1))

    def from_full(_):
        return jnp.take(jax.lax.top_k(keys, max_rank + 1)[0], rank, mode="clip")

    return jax.lax.cond(ok, from_bracket, from_full, None)


def _thresholds(keys: Array, direct_top: Array, count: Array,
                inverse_fpr: tuple[int, ...]) -> Array:
    """``[K]``: the negative at descending rank ``L // a`` for each anchor a (0 when L = 0)."""
    pairs = keys.shape[0]
    out = []
    for a in inverse_fpr:
        rank = count // a
        if pairs // a < direct_top.shape[0]:
            out.append(jnp.take(direct_top, rank, mode="clip"))
        else:
            out.append(_select_rank(keys, count, rank, pairs // a))
    return jnp.where(count > 0, jnp.stack(out), 0.0)


def ekd_batch_thresholds(student: Array, teacher: Array, labels: Array, *,
                         inverse_fpr: Sequence[int] = INVERSE_FPR
                         ) -> tuple[Array, Array, Array]:
    """This batch's thresholds at the FPR anchors, before any running average (Huang et al.
    2022: the threshold at FPR 1/a is the similarity of the negative pair ranked ``L // a``
    among the batch's L negative pairs, descending).

    A batch with fewer than a negatives for anchor a (``L // a == 0``) takes its hardest
    negative: TFace's integer division does that, and so does this function. With no negative
    pair at all (every label equal) the thresholds are undefined: 0 is returned and
    ``num_negatives`` is 0, which ``ekd_loss`` reads as "leave the state unchanged".

    Args:
      student: ``[N, D_s]`` float embeddings (any norm; normalized here), N >= 2.
      teacher: ``[N, D_t]`` float embeddings.
      labels: ``[N]`` int identities (pairs with equal labels are positives).
      inverse_fpr: the anchors as ints ``1 / FPR`` (default ``10 .. 10**6``).

    Returns:
      ``(student_thresholds [K], teacher_thresholds [K], num_negatives)``, without gradient.
    """
    _check_inputs(student, teacher, labels)
    inverse_fpr = _check_inverse_fpr(inverse_fpr)
    dtype = compute_dtype(student, teacher)
    s_sim = _similarities(jax.lax.stop_gradient(student.astype(dtype)))
    t_sim = _similarities(jax.lax.stop_gradient(teacher.astype(dtype)))
    s_keys, t_keys, _, count = _negative_keys(s_sim, t_sim, labels)
    k = _direct_size(s_keys.shape[0], inverse_fpr, 1)
    return (_thresholds(s_keys, jax.lax.top_k(s_keys, k)[0], count, inverse_fpr),
            _thresholds(t_keys, jax.lax.top_k(t_keys, k)[0], count, inverse_fpr), count)


def ekd_loss(student: Array, teacher: Array, labels: Array, state: EkdState, *,
             inverse_fpr: Sequence[int] = INVERSE_FPR, momentum: float = MOMENTUM,
             temperature: float = TEMPERATURE, top_negatives: int = TOP_NEGATIVES,
             positive_weight: float = POSITIVE_WEIGHT,
             negative_weight: float = NEGATIVE_WEIGHT) -> tuple[Array, EkdState]:
    """EKD loss of one batch and the updated running thresholds (Huang et al. 2022, its rank loss).

    ``s_ij = cos(student_i, student_j)``, ``t_ij`` likewise, over pairs ``i < j``. The running
    thresholds are updated first, ``A <- m * batch + (1 - m) * A`` for student and teacher
    (``ekd_batch_thresholds``), and the loss is taken against the *updated* ones, in TFace's
    order. The soft rank of a pair is ``r(x; A) = sum_k sigmoid((x - A_k) / T)`` (exponent
    clamped to ±50), and::

        loss = w_pos * mean_{positive (i, j)} (r(s_ij; A_s) - r(t_ij; A_t))^2
             + w_neg * mean_{hard negative (i, j)} (r(s_ij; A_s) - r(t_ij; A_t))^2

    with the hard negatives the ``min(top_negatives, L)`` negatives of highest ``s_ij``.

    Choices where the official code has no answer (it raises or returns NaN):

    * no positive pair in the batch: the positive term is 0 (an empty mean would be NaN);
    * no negative pair: the negative term is 0 and the state is returned unchanged;
    * fewer negatives than an anchor needs: that threshold is the hardest negative (rank 0,
      TFace's ``L // a``), and fewer than ``top_negatives``: all negatives are used;
    * ties between hard-negative similarities at the cut are broken by pair order (row-major
      ``i < j``); ``torch.sort`` leaves them unspecified.

    The state, the thresholds and the teacher carry no gradient; the student gets it through
    ``s_ij`` in both terms.

    Args:
      student: ``[N, D_s]`` float embeddings (L2-normalized here), N >= 2.
      teacher: ``[N, D_t]`` float embeddings (``stop_gradient``).
      labels: ``[N]`` int identities.
      state: ``EkdState`` of ``[K]`` thresholds (``ekd_init_state()`` before the first step).
      inverse_fpr: the K anchors as ``1 / FPR`` ints (TFace: 10 .. 10**6).
      momentum: weight of the batch in the running average (TFace: 0.01); 1 uses this batch's
        thresholds only.
      temperature: sigmoid temperature T (TFace: 0.01).
      top_negatives: number of hard negatives (TFace: 2000).
      positive_weight, negative_weight: the two terms' weights (TFace: 0.02, 0.01).

    Returns:
      ``(loss, new_state)``: a scalar (float32 for half-precision inputs) and the ``EkdState``
      to pass to the next step.
    """
    _check_inputs(student, teacher, labels)
    inverse_fpr = _check_inverse_fpr(inverse_fpr)
    state = _check_state(state, len(inverse_fpr))
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    check_positive("temperature", temperature)
    if isinstance(top_negatives, bool) or not isinstance(top_negatives, int) or top_negatives < 1:
        raise ValueError(f"top_negatives must be a positive int, got {top_negatives!r}")
    n = student.shape[0]
    dtype = compute_dtype(student, teacher)
    s_sim = _similarities(student.astype(dtype))
    t_sim = _similarities(jax.lax.stop_gradient(teacher).astype(dtype))

    s_keys, t_keys, pair_flat, count = _negative_keys(s_sim, t_sim, labels)
    k = _direct_size(s_keys.shape[0], inverse_fpr, top_negatives)
    s_top, s_idx = jax.lax.top_k(s_keys, k)
    t_top = jax.lax.top_k(t_keys, _direct_size(s_keys.shape[0], inverse_fpr, 1))[0]
    s_flat = pair_flat[s_idx]
    old = EkdState(*(jax.lax.stop_gradient(a.astype(dtype)) for a in state))
    batch_s = _thresholds(s_keys, s_top, count, inverse_fpr)
    batch_t = _thresholds(t_keys, t_top, count, inverse_fpr)
    has_negatives = count > 0
    new = EkdState(jnp.where(has_negatives, momentum * batch_s + (1.0 - momentum) * old.student,
                             old.student),
                   jnp.where(has_negatives, momentum * batch_t + (1.0 - momentum) * old.teacher,
                             old.teacher))
    anchors_s, anchors_t = jax.lax.stop_gradient(new.student), jax.lax.stop_gradient(new.teacher)

    # positives: one masked pass over [N, N] (upper triangle, equal labels)
    labels = jnp.asarray(labels)
    upper = jnp.arange(n)[:, None] < jnp.arange(n)[None, :]
    positive = upper & (labels[:, None] == labels[None, :])
    diff = _soft_count(s_sim, anchors_s, temperature) - _soft_count(t_sim, anchors_t, temperature)
    num_pos = jnp.sum(positive, dtype=jnp.int32)
    pos_sum = jnp.sum(jnp.where(positive, diff * diff, 0.0))
    pos_term = jnp.where(num_pos > 0, pos_sum / jnp.maximum(num_pos, 1).astype(dtype), 0.0)

    # hard negatives: the student's top ones, gathered from [N, N] so gradient reaches s_sim
    hard = min(top_negatives, k)  # k >= top_negatives unless there are fewer pairs
    flat = s_flat[:hard]
    valid = jnp.arange(hard) < count
    s_hard = s_sim.reshape(-1)[flat]
    t_hard = t_sim.reshape(-1)[flat]
    d_hard = (_soft_count(s_hard, anchors_s, temperature)
              - _soft_count(t_hard, anchors_t, temperature))
    num_hard = jnp.minimum(count, hard)
    neg_sum = jnp.sum(jnp.where(valid, d_hard * d_hard, 0.0))
    neg_term = jnp.where(num_hard > 0, neg_sum / jnp.maximum(num_hard, 1).astype(dtype), 0.0)

    loss = positive_weight * pos_term + negative_weight * neg_term
    return loss, EkdState(new.student.astype(state.student.dtype),
                          new.teacher.astype(state.teacher.dtype))
