"""Logit-level distillation: Hinton's soft targets and the hard (label) loss.

Two forms of the soft loss appear in the seeds and are kept apart here:

* ``soft_prediction_loss``: the cross-entropy ``H(softmax(t/τ), softmax(s/τ))`` written by seed
  wang2019 eq. (3) and seed kd_transfer eq. (2) (second term), with no τ² factor.
* ``hinton_kd_loss``: ``τ² KL(softmax(t/τ) || softmax(s/τ))``, Hinton et al.'s form with the τ²
  gradient rescaling, used as "HKD" with τ = 4 by seed nikitin2020 eq. (12).

The two differ by τ² and by the teacher entropy ``H(softmax(t/τ))``, which is constant with
respect to the student, so their student gradients differ only by the factor τ².
Teacher logits are frozen inputs: both apply ``stop_gradient`` to them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdface.losses._checks import (check_float, check_option, check_positive, check_rank,
                                   check_same_shape, compute_dtype)
from kdface.losses._classification import REDUCTIONS, apply_reduction, softmax_cross_entropy


def _student_teacher_log_probs(student_logits: Any, teacher_logits: Any, temperature: float,
                               reduction: Any) -> tuple[jax.Array, jax.Array]:
    check_float("student_logits", student_logits)
    check_float("teacher_logits", teacher_logits)
    check_rank("student_logits", student_logits, 2, "[N, C]")
    check_rank("teacher_logits", teacher_logits, 2, "[N, C]")
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_positive("temperature", temperature)
    check_option("reduction", reduction, REDUCTIONS)
    dtype = compute_dtype(student_logits, teacher_logits)
    teacher = jax.lax.stop_gradient(teacher_logits).astype(dtype)
    log_p_s = jax.nn.log_softmax(student_logits.astype(dtype) / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    return log_p_s, log_p_t


def hinton_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float,
                   reduction: str | None = "mean") -> jax.Array:
    """Hinton KD ``τ² KL(p_t || p_s)`` with ``p = softmax(logits / τ)``.

    Seed nikitin2020 eq. (12), the HKD term (τ = 4 there); the same soft targets as seed wang2019
    eq. (3). Returns the KL divergence, not the cross-entropy: it is 0 when the student matches
    the teacher, and differs from ``τ² H(p_t, p_s)`` by the teacher entropy ``τ² H(p_t)``, a
    constant for the student (see ``soft_prediction_loss`` for the cross-entropy form). The τ²
    factor keeps the soft-target gradients on the scale of the hard loss as τ changes.
    ``teacher_logits`` get ``stop_gradient``.

    Args:
      student_logits: ``[N, C]`` float.
      teacher_logits: ``[N, C]`` float.
      temperature: τ > 0.
      reduction: ``'mean'`` over the batch (default), ``'sum'``, or ``None``/``'none'``.

    Returns:
      scalar, or ``[N]`` per-example values.

    >>> import jax.numpy as jnp
    >>> float(hinton_kd_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=4.0))
    0.0
    """
    log_p_s, log_p_t = _student_teacher_log_probs(student_logits, teacher_logits, temperature,
                                                  reduction)
    per_example = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return apply_reduction(temperature ** 2 * per_example, reduction)


def soft_prediction_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
                         temperature: float, reduction: str | None = "mean") -> jax.Array:
    """Cross-entropy between soft predictions ``H(p_t, p_s) = -Σ_c p_t,c log p_s,c``.

    ``p = softmax(logits / τ)``. Seed wang2019 eq. (3) ("the soft loss is the cross entropy
    between X_T^τ and X_S^τ") and seed kd_transfer eqs. (1)-(2), whose second term is the
    cross-entropy between the teacher's and student's soft predictions. Neither writes a τ²
    factor, so none is applied (compare ``hinton_kd_loss``). The value includes the teacher
    entropy, so it is not 0 when the student matches the teacher. ``teacher_logits`` get
    ``stop_gradient``.

    Args:
      student_logits: ``[N, C]`` float.
      teacher_logits: ``[N, C]`` float.
      temperature: τ > 0 (the seeds tune it by cross-validation; no value survives in them).
      reduction: ``'mean'`` over the batch (default), ``'sum'``, or ``None``/``'none'``.

    Returns:
      scalar, or ``[N]`` per-example values.
    """
    log_p_s, log_p_t = _student_teacher_log_probs(student_logits, teacher_logits, temperature,
                                                  reduction)
    per_example = -jnp.sum(jnp.exp(log_p_t) * log_p_s, axis=-1)
    return apply_reduction(per_example, reduction)


def hard_loss(student_logits: jax.Array, labels: jax.Array, *,
              reduction: str | None = "mean") -> jax.Array:
    """Hard loss ``H(softmax(z_S), y)``: softmax cross-entropy with the identity labels.

    Seed wang2019 eq. (4); the first term of seed kd_transfer eq. (2). Same as
    ``softmax_cross_entropy``: ``student_logits`` ``[N, C]`` float, ``labels`` ``[N]`` int;
    returns a scalar or ``[N]``.
    """
    return softmax_cross_entropy(student_logits, labels, reduction=reduction)
