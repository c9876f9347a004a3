"""Classification losses and margin heads for face recognition.

Margin heads turn the cosines between (normalized) embeddings and class weights into logits;
``softmax_cross_entropy`` then trains on them. The heads serve the five papers as base losses:
CosFace (Nikitin et al. 2020, s=64, m=0.35), ArcFace (Yan et al. 2019 eq. (6)) and SphereFace's
A-Softmax (the teacher backbones of Wang et al. 2019 are SphereFace networks).

Shapes: ``cos_theta``/``logits`` ``[N, C]``, ``labels`` int ``[N]`` in ``[0, C)``. A class axis
split over devices that do not divide it is padded (``kdface.models.padded_class_count``: MS1M's
85,742 classes are 85,760 columns on 64 chips): ``[N, W]`` with ``W >= C``. The margin functions
take the real count as ``classes=`` and give the padding columns ``PADDING_LOGIT``
(``mask_padding_classes``), so every softmax over them equals the one over the ``C`` classes.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdface._math import logsumexp
from kdface.losses._checks import (check_float, check_labels, check_option, check_positive,
                                   check_rank, compute_dtype)

REDUCTIONS = ("mean", "sum", "none", None)

# The logit of a padding class. Finite, so that p log p and the soft losses' p_t (t - s) stay 0
# on it (-inf would make them NaN), and low enough that its exp, shifted by any real logit
# (|logit| < 1e6) and divided by any temperature below 1e3, underflows to exactly 0 in float32
# (below -104): softmaxes, log-sum-exps and KL divergences over the padded axis are those over
# the real classes, and the padding gets no gradient (it is written with where).
PADDING_LOGIT = -1e9


def apply_reduction(per_example: jax.Array, reduction: str | None) -> jax.Array:
    """Reduces a per-example loss ``[N]``: ``'mean'``, ``'sum'``, or ``None``/``'none'``."""
    if reduction == "mean":
        return jnp.mean(per_example)
    if reduction == "sum":
        return jnp.sum(per_example)
    return per_example


def check_label_range(name: str, labels: Any, num_classes: int) -> None:
    """Raises ValueError if concrete ``labels`` fall outside ``[0, num_classes)``.

    Traced labels (inside ``jit``) cannot be inspected; there an out-of-range id is the caller's
    bug and ``take_along_axis`` clamps it.
    """
    try:
        values = np.asarray(labels)
    except jax.errors.TracerArrayConversionError:
        return
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), "
                         f"got values in [{values.min()}, {values.max()}]")


def _check_logits_and_labels(name: str, x: Any, labels: Any, classes: Any = None) -> int:
    """Checks the pair; returns the real class count (``classes``, or the width)."""
    check_float(name, x)
    check_rank(name, x, 2, "[N, C]")
    check_labels("labels", labels, x.shape[0])
    classes = _checked_classes(classes, x.shape[1])
    check_label_range("labels", labels, classes)
    return classes


def _checked_classes(classes: Any, width: int) -> int:
    if classes is None:
        return width
    if not isinstance(classes, (int, np.integer)) or isinstance(classes, bool):
        raise TypeError(f"classes must be an int (the real class count), got {classes!r}")
    if not 1 <= classes <= width:
        raise ValueError(f"classes must lie in [1, {width}] (the class axis is {width} wide, "
                         f"padding included), got {classes}")
    return int(classes)


def mask_padding_classes(logits: jax.Array, classes: int | None) -> jax.Array:
    """``logits [N, W]`` with the padding columns (from ``classes`` on) set to ``PADDING_LOGIT``:
    no softmax puts mass on them, no argmax picks them, no gradient reaches them. ``classes``
    None or ``W``: unchanged. The mask is an iota compare inside the consumer's elementwise
    fusion, so a class-split axis stays split (no slice, which XLA cannot keep even when the
    devices do not divide ``classes``)."""
    width = logits.shape[-1]
    classes = _checked_classes(classes, width)
    if classes == width:
        return logits
    real = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1) < classes
    return jnp.where(real, logits, jnp.asarray(PADDING_LOGIT, logits.dtype))


def _check_number(name: str, value: Any, *, minimum: float = 0.0) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                          reduction: str | None = "mean",
                          logit_bound: float | None = None) -> jax.Array:
    """Softmax cross-entropy ``-log softmax(logits)[label]``.

    The "softmax loss" / hard loss of the seeds (Wang et al. 2019 eq. (4) H(X_S, y); the first term
    of Wang et al. 2017 eq. (2), and its eq. (3)), and the loss on margin logits: the margin
    heads (``cosface_logits``/``arcface_logits``/``sphereface_logits``) already carry the scale
    and the margin, so Yan et al. 2019 eq. (6) is this function fed ``arcface_logits``. Computed
    in float32 for half-precision logits.

    Args:
      logits: ``[N, C]`` float.
      labels: ``[N]`` int class ids in ``[0, C)`` (checked when concrete).
      reduction: ``'mean'`` (default), ``'sum'``, or ``None``/``'none'`` for the ``[N]`` losses.
      logit_bound: where known, a bound ``B`` with no logit above ``B`` and each row's largest
        at least ``-B`` (margin logits of scale ``s``: ``B = s``); the log-sum-exp then needs no
        pass for the row maximum (``kdface._math.logsumexp``). The same loss.

    Returns:
      scalar, or ``[N]`` when not reduced.

    >>> import jax.numpy as jnp
    >>> float(softmax_cross_entropy(jnp.zeros((1, 4)), jnp.array([2])))  # log 4
    1.3862943649291992
    """
    _check_logits_and_labels("logits", logits, labels)
    check_option("reduction", reduction, REDUCTIONS)
    x = logits.astype(compute_dtype(logits))
    target = jnp.take_along_axis(x, labels[:, None], axis=-1)[:, 0]
    per_example = logsumexp(x, axis=-1, bound=logit_bound) - target
    return apply_reduction(per_example, reduction)


# The name the margin-head papers use; the same function, kept because it is public API.
margin_cross_entropy = softmax_cross_entropy


def _clipped_cosines(cos_theta: jax.Array) -> jax.Array:
    # Cosines from normalized vectors can leave [-1, 1] by an ulp; sqrt(1 - c^2) and arccos
    # would then give NaN. Written with where, not clip, so that c = ±1 itself keeps gradient 1
    # (clip splits the gradient in half at its bounds).
    c = cos_theta.astype(compute_dtype(cos_theta))
    return jnp.where(c > 1.0, 1.0, jnp.where(c < -1.0, -1.0, c))


def _target_mask(labels: jax.Array, num_classes: int) -> jax.Array:
    """Boolean ``[N, C]``, True at each example's label."""
    return labels[:, None] == jnp.arange(num_classes)[None, :]


def _with_target(c: jax.Array, labels: jax.Array, target: jax.Array) -> jax.Array:
    """``c`` with each row's label entry replaced by ``target`` ``[N]`` (exactly, via where)."""
    return jnp.where(_target_mask(labels, c.shape[1]), target[:, None], c)


def cosface_logits(cos_theta: jax.Array, labels: jax.Array, *, scale: float = 64.0,
                   margin: float = 0.35, classes: int | None = None) -> jax.Array:
    """CosFace (large margin cosine) logits ``s * (cos θ_j - m * [j == y])``.

    The base classification loss of Nikitin et al. 2020 (Sec. 4, "margin = 0.35 and scale = 64.0",
    the defaults here). Feed the result to ``softmax_cross_entropy``.

    Args:
      cos_theta: ``[N, C]`` float cosines between normalized embeddings and class weights;
        clipped to ``[-1, 1]``.
      labels: ``[N]`` int class ids.
      scale: s > 0.
      margin: m >= 0; m = 0 gives ``s * cos θ``.
      classes: the real class count when ``cos_theta`` is padded beyond it (a head split over
        devices that do not divide it); its padding columns get ``PADDING_LOGIT``.

    Returns:
      ``[N, C]`` logits (float32 for half-precision inputs).
    """
    classes = _check_logits_and_labels("cos_theta", cos_theta, labels, classes)
    check_positive("scale", scale)
    _check_number("margin", margin)
    c = _clipped_cosines(cos_theta)
    onehot = _target_mask(labels, c.shape[1]).astype(c.dtype)
    return mask_padding_classes(scale * (c - margin * onehot), classes)


def _sin_from_cos(c: jax.Array) -> jax.Array:
    """sqrt(1 - c^2) with a finite derivative everywhere on [-1, 1].

    The true derivative -c / sqrt(1 - c^2) is infinite at c = ±1. Within one machine epsilon of
    those points (c = ±1 up to an ulp) the value is kept exact but its derivative is taken as 0,
    the subgradient convention at the boundary; elsewhere the derivative is exact (at most
    ~1/sqrt(eps), about 3e3 in float32).
    """
    s2 = (1.0 - c) * (1.0 + c)  # accurate near c = ±1, unlike 1 - c * c
    eps = jnp.finfo(c.dtype).eps
    inner = s2 > eps
    safe = jnp.where(inner, s2, 1.0)
    return jnp.where(inner, jnp.sqrt(safe), jnp.sqrt(jax.lax.stop_gradient(jnp.maximum(s2, 0.0))))


def arcface_logits(cos_theta: jax.Array, labels: jax.Array, *, scale: float = 64.0,
                   margin: float = 0.5, easy_margin: bool = False,
                   classes: int | None = None) -> jax.Array:
    """ArcFace (additive angular margin) logits: ``s * cos(θ_y + m)`` on the target class.

    Yan et al. 2019 eq. (6) (VarGFaceNet trains with ArcFace). Non-target classes get
    ``s * cos θ_j``.
    ``cos(θ + m)`` is evaluated as ``cos θ cos m - sin θ sin m`` with ``sin θ = sqrt(1 - cos² θ)``.

    cos(θ + m) stops decreasing in θ once θ + m > π, so the target logit needs a fallback there
    (the choice of the insightface reference code, which the paper uses):

    * ``easy_margin=False`` (default): where ``cos θ <= cos(π - m)`` use ``cos θ - m sin m``
      (a CosFace-style penalty; note it is not continuous with cos(θ + m) at θ = π - m).
    * ``easy_margin=True``: apply the margin only where ``cos θ > 0``; elsewhere ``cos θ``.

    Gradients are finite everywhere, including cos θ = ±1, where the infinite derivative of
    sin θ is replaced by 0 (see ``_sin_from_cos``).

    Args:
      cos_theta: ``[N, C]`` float cosines, clipped to ``[-1, 1]``.
      labels: ``[N]`` int class ids.
      scale: s > 0 (64 as in ArcFace).
      margin: angular margin m in radians, 0 <= m < π/2 (0.5 as in ArcFace).
      easy_margin: see above.
      classes: the real class count of a padded ``cos_theta`` (as ``cosface_logits``).

    Returns:
      ``[N, C]`` logits (float32 for half-precision inputs).
    """
    classes = _check_logits_and_labels("cos_theta", cos_theta, labels, classes)
    check_positive("scale", scale)
    _check_number("margin", margin)
    if margin >= math.pi / 2:
        raise ValueError(f"margin must be < pi/2 radians, got {margin}")
    c = _clipped_cosines(cos_theta)
    cos_y = jnp.take_along_axis(c, labels[:, None], axis=-1)[:, 0]
    shifted = cos_y * math.cos(margin) - _sin_from_cos(cos_y) * math.sin(margin)
    if easy_margin:
        target = jnp.where(cos_y > 0.0, shifted, cos_y)
    else:
        target = jnp.where(cos_y > math.cos(math.pi - margin), shifted,
                           cos_y - margin * math.sin(margin))
    return mask_padding_classes(scale * _with_target(c, labels, target), classes)


def _chebyshev(c: jax.Array, m: int) -> jax.Array:
    """cos(mθ) as the Chebyshev polynomial T_m(cos θ): a polynomial, so smooth at ±1."""
    prev, cur = jnp.ones_like(c), c
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * c * cur - prev
    return cur


def sphereface_logits(cos_theta: jax.Array, labels: jax.Array, *,
                      feature_norm: jax.Array | None = None, margin: int = 4,
                      lambda_: float | jax.Array = 0.0,
                      classes: int | None = None) -> jax.Array:
    """SphereFace A-Softmax logits with the multiplicative angular margin.

SphereFace (Liu et al. 2017) eq. (7), the loss of the Wang et al. 2019 teacher and student nets.

    Target class: ``||x|| ψ(θ_y)`` with ``ψ(θ) = (-1)^k cos(mθ) - 2k`` for
    ``θ ∈ [kπ/m, (k+1)π/m]`` (monotone decreasing on [0, π]); ``cos(mθ)`` is the Chebyshev
    polynomial of ``cos θ``. Non-target classes: ``||x|| cos θ_j``. With the annealing weight
    λ (``sphereface_lambda``) the target becomes ``||x|| (λ cos θ_y + ψ(θ_y)) / (1 + λ)``, as in
    SphereFace's public training code; λ = 0 is the pure A-Softmax.

    k is piecewise constant and computed without gradient, so gradients are finite at
    cos θ = ±1.

    Args:
      cos_theta: ``[N, C]`` float cosines between embeddings and normalized class weights,
        clipped to ``[-1, 1]``.
      labels: ``[N]`` int class ids.
      feature_norm: ``[N]`` float embedding norms ``||x||``; ``None`` means 1 (normalized
        embeddings, in which case a scale is usually applied by the caller).
      margin: integer m >= 1 (4 in SphereFace).
      lambda_: λ >= 0, a Python number or a scalar array (it may change every step under jit).
      classes: the real class count of a padded ``cos_theta`` (as ``cosface_logits``).

    Returns:
      ``[N, C]`` logits (float32 for half-precision inputs).
    """
    classes = _check_logits_and_labels("cos_theta", cos_theta, labels, classes)
    if not isinstance(margin, int) or isinstance(margin, bool):
        raise TypeError(f"margin must be a Python int (the multiplicative margin m), "
                        f"got {type(margin).__name__}")
    if margin < 1:
        raise ValueError(f"margin must be >= 1, got {margin}")
    if isinstance(lambda_, (int, float)):
        _check_number("lambda_", lambda_)
    elif np.ndim(lambda_) != 0:
        raise ValueError(f"lambda_ must be a scalar, got shape {tuple(np.shape(lambda_))}")
    c = _clipped_cosines(cos_theta)
    n = c.shape[0]
    if feature_norm is None:
        norm = jnp.ones((n,), c.dtype)
    else:
        check_float("feature_norm", feature_norm)
        check_rank("feature_norm", feature_norm, 1, "[N]")
        if feature_norm.shape[0] != n:
            raise ValueError(f"feature_norm must have shape [N]=[{n}], "
                             f"got {tuple(feature_norm.shape)}")
        norm = feature_norm.astype(c.dtype)
    cos_y = jnp.take_along_axis(c, labels[:, None], axis=-1)[:, 0]
    theta = jnp.arccos(jax.lax.stop_gradient(cos_y))
    k = jnp.clip(jnp.floor(margin * theta / math.pi), 0, margin - 1)
    sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
    psi = sign * _chebyshev(cos_y, margin) - 2.0 * k
    lam = jnp.asarray(lambda_, c.dtype)
    target = (lam * cos_y + psi) / (1.0 + lam)
    return mask_padding_classes(norm[:, None] * _with_target(c, labels, target), classes)


def sphereface_lambda(step: int | jax.Array, *, base: float = 1000.0, gamma: float = 0.12,
                      power: float = 1.0, lambda_min: float = 5.0) -> jax.Array:
    """The usual SphereFace annealing ``λ = max(λ_min, base (1 + γ step)^(-power))``.

    The defaults are those of SphereFace's public training configuration (wy1iu/sphereface,
    ``sphereface_model.prototxt``: base 1000, gamma 0.12, power 1, lambda_min 5). ``step`` may
    be a traced integer; returns a float32 scalar for ``sphereface_logits(lambda_=...)``.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.maximum(lambda_min, base * jnp.power(1.0 + gamma * step, -power))
