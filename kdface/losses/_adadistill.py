"""AdaDistill, adaptive knowledge distillation embedded in the margin loss: before each step the
class centres of the batch's labels move towards the teacher's normalized embeddings, by an
adaptive weight, and the student then trains with ArcFace / CosFace against those centres.

For sample i with label y (Boutros et al. 2024, the adaptive centre update; the official code's
``AdaptiveAArcFace`` / ``AdaptiveACosFace``, fdbtrs/AdaDistill ``utils/losses.py``)::

    lam_i   = clamp(cos(c_y, t_i), 1e-6, 1)                  # centre vs teacher
    alpha_i = clamp(clamp(cos(s_i, t_i), -1, 1) * lam_i, 1e-6, 1)
    c_y    <- alpha_i * c_y + (1 - alpha_i) * t_i / |t_i|     # no renormalization of c_y

so a sample the student already agrees on with the teacher (alpha near 1: an easy sample) moves
its centre less, and a hard one pulls it towards the teacher. The update carries no gradient (the
official code runs it under ``torch.no_grad`` and never trains the head); the centres are stored
unnormalized and normalized only when the logits are formed, ``cos_ij = <s_i/|s_i|, c_j/|c_j|>``.

Layout: ``centres: [E, C]``, one column per class, the layout of ``kdface.models.MarginHead``'s
weight and of the official ``kernel``. A trainer carries them from step to step (kdface's
``adadistill`` term keeps them as its state, placed like the margin head); the sharded version
of the update (each shard scattering the columns it owns) is ``adadistill_centres_sharded``,
run inside ``jax.shard_map``; it gives the replicated result (bit for bit on one shard).

References:
  Boutros, F., Štruc, V., Damer, N. AdaDistill: Adaptive Knowledge Distillation for Deep Face
  Recognition. ECCV 2024. https://arxiv.org/abs/2407.01332
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdface._math import L2_NORM_EPS, l2_normalize
from kdface.losses._checks import (check_embeddings, check_float, check_labels, check_option,
                                   check_positive, check_rank, check_same_shape, compute_dtype)
from kdface.losses._classification import (REDUCTIONS, arcface_logits, check_label_range,
                                           cosface_logits, softmax_cross_entropy)

Array = jax.Array

# Both clamps of alpha: fdbtrs/AdaDistill ``utils/losses.py``, ``.clamp(1e-6, 1)`` on the
# centre-teacher cosine and ``target_logit.clamp(1e-6, 1.0)`` on the product.
ALPHA_FLOOR = 1e-6
HEADS = ("arcface", "cosface")
# Scale and margins: ``config/config.py`` of the official code sets s = 64 and m = 0.45 for its
# ArcFace runs (``config.loss = "ArcFace"``); CosFace's m = 0.35 is ``AdaptiveACosFace``'s default
# (the CosFace paper's value).
SCALE = 64.0
MARGINS = {"arcface": 0.45, "cosface": 0.35}
HIGHEST = jax.lax.Precision.HIGHEST


def _check_inputs(centres: Any, student: Any, teacher: Any, labels: Any) -> None:
    check_float("centres", centres)
    check_rank("centres", centres, 2, "[E, C]")
    check_embeddings("student", student)
    check_embeddings("teacher", teacher)
    check_same_shape("student", student, "teacher", teacher)
    if student.shape[1] != centres.shape[0]:
        raise ValueError(f"student/teacher embeddings [N, E] and centres [E, C] must share E, got "
                         f"E={student.shape[1]} and centres of shape {tuple(centres.shape)}")
    check_labels("labels", labels, student.shape[0])
    check_label_range("labels", labels, centres.shape[1])


def _unit_pair(student: Array, teacher: Array, dtype: Any) -> tuple[Array, Array]:
    return (l2_normalize(student.astype(dtype)),
            l2_normalize(jax.lax.stop_gradient(teacher).astype(dtype)))


def _alpha_of(c_y: Array, s_unit: Array, t_unit: Array) -> Array:
    """``[N]`` alpha from each sample's pre-step centre ``c_y: [E, N]`` (no gradient)."""
    s_unit, t_unit = jax.lax.stop_gradient(s_unit), jax.lax.stop_gradient(t_unit)
    cos_st = jnp.clip(jnp.sum(s_unit * t_unit, axis=1), -1.0, 1.0)
    lam = jnp.clip(jnp.sum(l2_normalize(jax.lax.stop_gradient(c_y).T) * t_unit, axis=1),
                   ALPHA_FLOOR, 1.0)
    return jnp.clip(cos_st * lam, ALPHA_FLOOR, 1.0)


def _alpha(centres: Array, s_unit: Array, t_unit: Array, labels: Array) -> Array:
    """``[N]`` alpha from unit student/teacher rows and the pre-step centres (no gradient)."""
    return _alpha_of(jnp.take(centres, jnp.asarray(labels), axis=1), s_unit, t_unit)


def adadistill_alpha(centres: Array, student: Array, teacher: Array, labels: Array) -> Array:
    """The adaptive weight of each sample, ``alpha = clamp(cos(s, t) * clamp(cos(c_y, t), 1e-6,
    1), 1e-6, 1)`` (Boutros et al. 2024; the official code's ``target_logit_mean``),
    computed from the centres *before* this step's update.

    Args:
      centres: ``[E, C]`` float class centres (columns; any norm).
      student: ``[N, E]`` float student embeddings.
      teacher: ``[N, E]`` float teacher embeddings.
      labels: ``[N]`` int class ids in ``[0, C)``.

    Returns:
      ``[N]`` in ``[1e-6, 1]``, without gradient.
    """
    _check_inputs(centres, student, teacher, labels)
    dtype = compute_dtype(centres, student, teacher)
    s_unit, t_unit = _unit_pair(student, teacher, dtype)
    return _alpha(centres.astype(dtype), s_unit, t_unit, labels)


def _last_occurrence(labels: Array) -> Array:
    """``[N]`` bool, True where no later sample of the batch has the same label."""
    n = labels.shape[0]
    later = jnp.arange(n)[:, None] < jnp.arange(n)[None, :]
    return ~jnp.any(later & (labels[:, None] == labels[None, :]), axis=1)


def _moved(c_y: Array, s_unit: Array, t_unit: Array) -> Array:
    """``[E, N]`` each sample's new centre from its pre-step one ``c_y: [E, N]``."""
    alpha = _alpha_of(c_y, s_unit, t_unit)
    return alpha[None, :] * c_y + (1.0 - alpha[None, :]) * jax.lax.stop_gradient(t_unit).T


def _written(centres: Array, columns: Array, moved: Array, keep: Array) -> Array:
    """``centres`` with ``moved[:, i]`` written at column ``columns[i]`` where ``keep[i]``.

    Each sample's candidate is computed from the pre-step centre (the official code reads
    kernel[:, label] once, then writes every column); of a label's duplicates the last one in
    batch order is written, as torch's CPU index assignment does. Other duplicates (and columns
    ``keep`` leaves out) are sent past the end and dropped, so the scatter sees unique indices
    and is deterministic."""
    target = jnp.where(keep, columns, centres.shape[1])
    return jax.lax.stop_gradient(centres.at[:, target].set(moved.astype(centres.dtype),
                                                           mode="drop"))


def _updated(centres: Array, s_unit: Array, t_unit: Array, labels: Array) -> Array:
    centres, labels = jnp.asarray(centres), jnp.asarray(labels)
    c_y = jax.lax.stop_gradient(jnp.take(centres, labels, axis=1))           # [E, N]
    return _written(centres, labels, _moved(c_y, s_unit, t_unit), _last_occurrence(labels))


def adadistill_centres(centres: Array, student: Array, teacher: Array, labels: Array) -> Array:
    """The class centres after AdaDistill's update of one batch (Boutros et al. 2024).

    For each sample, ``c_y <- alpha * c_y + (1 - alpha) * t / |t|`` with ``alpha`` of
    ``adadistill_alpha``; columns of classes not in the batch are unchanged, and no column is
    renormalized (the logits normalize them).

    Duplicate labels: every sample's new column is computed from the pre-step centre, and the
    *last* sample of the label in batch order is the one kept. That is the official code's
    semantics (``kernel[:, label] = ...`` reads all old columns, then writes each in turn; on
    the CPU the last write of an index wins, on CUDA the winner is unspecified), made
    deterministic. Within one batch the duplicates are not chained or averaged.

    Args:
      centres: ``[E, C]`` float class centres (the ``MarginHead`` weight layout).
      student: ``[N, E]`` float student embeddings.
      teacher: ``[N, E]`` float teacher embeddings.
      labels: ``[N]`` int class ids in ``[0, C)``.

    Returns:
      ``[E, C]`` new centres, dtype of ``centres``, without gradient.
    """
    _check_inputs(centres, student, teacher, labels)
    dtype = compute_dtype(centres, student, teacher)
    s_unit, t_unit = _unit_pair(student, teacher, dtype)
    return _updated(centres, s_unit, t_unit, labels)


def adadistill_centres_sharded(centres: Array, student: Array, teacher: Array, labels: Array,
                               *, axis_name: str = "data") -> Array:
    """``adadistill_centres`` inside ``jax.shard_map`` with the class axis split over
    ``axis_name``: each device holds the contiguous columns ``d * C_d .. (d + 1) * C_d`` and
    writes only those it owns (the batch's other labels are dropped on it).

    Each sample's pre-step centre comes from the device that owns its class (one ``psum`` of
    ``[E, N]`` where every other device adds zeros, so the sum is that column exactly); alpha
    and the new columns are then computed on every device from the same values, and the
    result is the replicated update's (to float rounding where the two programs fuse the
    cosines differently: tests/test_term_state.py). Duplicate labels: the last in batch order
    is kept, as ``adadistill_centres``.

    Args:
      centres: ``[E, C_d]`` this device's columns of the ``[E, C]`` centres.
      student: ``[N, E]`` float student embeddings of the whole batch (replicated).
      teacher: ``[N, E]`` float teacher embeddings of the whole batch (replicated).
      labels: ``[N]`` int class ids in ``[0, C)`` (``C = C_d`` x the devices).

    Returns:
      ``[E, C_d]`` this device's new columns, without gradient.
    """
    check_float("centres", centres)
    check_rank("centres", centres, 2, "[E, C_d]")
    check_embeddings("student", student)
    check_embeddings("teacher", teacher)
    check_same_shape("student", student, "teacher", teacher)
    check_labels("labels", labels, student.shape[0])
    dtype = compute_dtype(centres, student, teacher)
    s_unit, t_unit = _unit_pair(student, teacher, dtype)
    width = centres.shape[1]
    local = jnp.asarray(labels) - jax.lax.axis_index(axis_name) * width
    own = (local >= 0) & (local < width)
    picked = jnp.take(jax.lax.stop_gradient(centres), jnp.clip(local, 0, width - 1), axis=1)
    c_y = jax.lax.psum(jnp.where(own[None, :], picked, jnp.zeros_like(picked)), axis_name)
    return _written(centres, local, _moved(c_y, s_unit, t_unit),
                    own & _last_occurrence(jnp.asarray(labels)))


def normalized_cosines(student: Array, centres: Array) -> Array:
    """``[N, C]`` cos θ of the L2-normalized ``student: [N, E]`` rows against the normalized
    columns of ``centres: [E, C]``, clipped to [-1, 1] (what ``adadistill_logits`` puts the
    margin on); zero columns (a split axis' padding) give cos 0."""
    return _normalized_cosines(l2_normalize(student.astype(compute_dtype(student, centres))),
                               centres)


def _normalized_cosines(s_unit: Array, centres: Array) -> Array:
    """``[N, C]`` ``<s_i, c_j / |c_j|>``, the column scaling applied after the product (as
    ``MarginHead``: no normalized ``[E, C]`` copy), clipped to [-1, 1]."""
    w = centres.astype(s_unit.dtype)
    sq = jnp.sum(w * w, axis=0, keepdims=True)
    cos = jnp.matmul(s_unit, w, precision=HIGHEST)
    return jnp.clip(cos * jax.lax.rsqrt(jnp.maximum(sq, L2_NORM_EPS * L2_NORM_EPS)), -1.0, 1.0)


def _margin(head: str, margin: float | None) -> float:
    check_option("head", head, HEADS)
    return MARGINS[head] if margin is None else margin


def adadistill_logits(student: Array, teacher: Array, labels: Array, centres: Array, *,
                      head: str = "arcface", scale: float = SCALE, margin: float | None = None
                      ) -> tuple[Array, Array]:
    """AdaDistill's margin logits: update the centres (``adadistill_centres``), then the
    ArcFace or CosFace logits of the student against the updated, normalized centres (Boutros et
    al. 2024: the margin loss against the updated centres).

    The margins are kdface's ``arcface_logits`` / ``cosface_logits``. For ArcFace that includes
    the insightface fallback ``cos θ - m sin m`` past ``θ > π - m``, where the official
    ``AdaptiveAArcFace`` evaluates ``cos(θ + m)`` as is; the two agree wherever the target
    angle is below ``π - m`` (cos θ_y > -0.90 at m = 0.45).

    Args:
      student: ``[N, E]`` float student embeddings (gradient flows here only).
      teacher: ``[N, E]`` float teacher embeddings (``stop_gradient``).
      labels: ``[N]`` int class ids in ``[0, C)``.
      centres: ``[E, C]`` float class centres before this step.
      head: ``'arcface'`` (default; the official config's loss) or ``'cosface'``.
      scale: s > 0 (official config: 64).
      margin: m; ``None`` takes the head's default (ArcFace 0.45 from the official config,
        CosFace 0.35).

    Returns:
      ``(logits [N, C], new_centres [E, C])``; feed the logits to ``softmax_cross_entropy`` and
      carry the centres to the next step.
    """
    _check_inputs(centres, student, teacher, labels)
    m = _margin(head, margin)
    check_positive("scale", scale)
    dtype = compute_dtype(centres, student, teacher)
    s_unit, t_unit = _unit_pair(student, teacher, dtype)
    new_centres = _updated(centres, s_unit, t_unit, labels)
    cos = _normalized_cosines(s_unit, new_centres)
    if head == "arcface":
        logits = arcface_logits(cos, labels, scale=scale, margin=m)
    else:
        logits = cosface_logits(cos, labels, scale=scale, margin=m)
    return logits, new_centres


def adadistill_loss(student: Array, teacher: Array, labels: Array, centres: Array, *,
                    head: str = "arcface", scale: float = SCALE, margin: float | None = None,
                    reduction: str | None = "mean") -> tuple[Array, Array]:
    """AdaDistill's training loss: the cross-entropy of ``adadistill_logits`` (Boutros et al.
    2024; the official training script's ``CrossEntropyLoss`` on the header's output).

    Args: as ``adadistill_logits`` (``student``/``teacher`` ``[N, E]``, ``labels`` ``[N]``,
      ``centres`` ``[E, C]``), and ``reduction`` ``'mean'`` (default), ``'sum'`` or
      ``None``/``'none'`` for the ``[N]`` losses.

    Returns:
      ``(loss, new_centres [E, C])``: a scalar (or ``[N]``) and the centres for the next step.
    """
    check_option("reduction", reduction, REDUCTIONS)
    logits, new_centres = adadistill_logits(student, teacher, labels, centres, head=head,
                                            scale=scale, margin=margin)
    return softmax_cross_entropy(logits, labels, reduction=reduction), new_centres

