"""Feature-level (hint) distillation: raw L2, normalized L2 and the angular distillation loss.

All three compare one student feature with one teacher feature per example:

* ``l2_hint_loss``: ``||s - t||²`` (FitNets-style hint; Wang et al. 2019 eq. (5) before
  normalization; the ℓ2 baseline of Duong et al. 2019).
* ``normalized_l2_loss``: ``||s/||s|| - t/||t|| ||²`` (Yan et al. 2019 eq. (5), Wang et al. 2019's
  "L2 loss for normalized feature" of eq. (6)). For unit vectors it equals ``2 (1 - cos)``.
* ``angular_distillation_loss``: ``(1 - cos(s, t))²`` (Duong et al. 2019 eq. (4), Yan et al. 2019
  eq. (4)).

Features are ``[N, D]`` embeddings or ``[N, H, W, C]`` stage feature maps; a feature map is
flattened to one ``H*W*C`` vector per example (Duong et al. 2019 applies the loss at intermediate
stages, after the teacher's remaining blocks, which the caller runs). Student and teacher must
have the same shape: a 1x1 adapter (``kdface.models``) maps widths first. Teacher features are
frozen inputs and get ``stop_gradient``; losses are averaged over the batch as the 1/N of the
papers' equations unless ``reduction`` says otherwise.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdface._math import l2_normalize
from kdface.losses._checks import check_float, check_option, check_same_shape, compute_dtype
from kdface.losses._classification import REDUCTIONS, apply_reduction



def _flat_pair(student: Any, teacher: Any, reduction: Any) -> tuple[jax.Array, jax.Array]:
    for name, x in (("student", student), ("teacher", teacher)):
        check_float(name, x)
        if np.ndim(x) not in (2, 4):
            raise ValueError(f"{name} must have shape [N, D] or [N, H, W, C], "
                             f"got shape {tuple(np.shape(x))}")
    check_same_shape("student", student, "teacher", teacher)
    check_option("reduction", reduction, REDUCTIONS)
    dtype = compute_dtype(student, teacher)
    n = student.shape[0]
    s = student.astype(dtype).reshape(n, -1)
    t = jax.lax.stop_gradient(teacher).astype(dtype).reshape(n, -1)
    return s, t


def l2_hint_loss(student: jax.Array, teacher: jax.Array, *, reduction: str | None = "mean",
                 squared: bool = True) -> jax.Array:
    """Raw hint loss: the squared Euclidean distance ``||s - t||²`` per example.

    Wang et al. 2019 eq. (5) writes ``||F_S - F_T||`` and calls it the "feature L2 loss"; the
    FitNets hint and Duong et al. 2019's ℓ2 baseline square it. The default is the squared
    distance summed over all feature elements (no 1/2, no division by D: Duong et al. 2019
    weight it by 0.001 "due to the large value of the loss with large feature map");
    ``squared=False`` gives the plain norm of eq. (5), whose gradient at s = t is taken as 0.

    Args:
      student: ``[N, D]`` or ``[N, H, W, C]`` float.
      teacher: same shape as ``student`` (gets ``stop_gradient``).
      reduction: ``'mean'`` over the batch (default), ``'sum'``, or ``None``/``'none'``.
      squared: see above.

    Returns:
      scalar, or ``[N]``.
    """
    s, t = _flat_pair(student, teacher, reduction)
    diff = s - t
    per_example = jnp.sum(diff * diff, axis=-1)
    if not squared:
        positive = per_example > 0.0
        per_example = jnp.where(positive, jnp.sqrt(jnp.where(positive, per_example, 1.0)), 0.0)
    return apply_reduction(per_example, reduction)


def normalized_l2_loss(student: jax.Array, teacher: jax.Array, *,
                       reduction: str | None = "mean") -> jax.Array:
    """Normalized hint ``|| s/||s|| - t/||t|| ||²`` per example.

    Yan et al. 2019 eq. (5) (``1/N Σ ||F_t/||F_t|| - F_s/||F_s|| ||²₂``, no 1/2) and the normalized
    feature L2 loss of Wang et al. 2019 eq. (6). Zero for ``s = a t`` with a > 0; equal to
    ``2 (1 - cos(s, t))``, so it ranges over [0, 4]. Wang et al. 2019's hint, eq. (5), prints
    ``L_Feature = ||F_S - F_T||`` without the square; the square there is kdface's choice (Caffe's
    Euclidean loss, and Yan et al.'s form).

    Args:
      student: ``[N, D]`` or ``[N, H, W, C]`` float.
      teacher: same shape as ``student`` (gets ``stop_gradient``).
      reduction: ``'mean'`` over the batch (default), ``'sum'``, or ``None``/``'none'``.

    Returns:
      scalar, or ``[N]``.
    """
    s, t = _flat_pair(student, teacher, reduction)
    diff = l2_normalize(s) - l2_normalize(t)
    return apply_reduction(jnp.sum(diff * diff, axis=-1), reduction)


def angular_distillation_loss(student: jax.Array, teacher: jax.Array, *,
                              reduction: str | None = "mean") -> jax.Array:
    """Angular distillation loss ``(1 - cos(s, t))²`` per example.

    Duong et al. 2019 eq. (4) (``|| 1 - G^t/||G^t|| * G^s/||G^s|| ||²₂``, the product being the
    cosine of the two features) with the 1/N batch mean of its eq. (7); Yan et al. 2019 eq. (4).
    Zero for parallel features of any norms; 4 for opposite ones.

    Args:
      student: ``[N, D]`` or ``[N, H, W, C]`` float (e.g. the student's stage features after
        the adapter and the teacher's remaining blocks).
      teacher: same shape as ``student`` (gets ``stop_gradient``).
      reduction: ``'mean'`` over the batch (default), ``'sum'``, or ``None``/``'none'``.

    Returns:
      scalar, or ``[N]``.
    """
    s, t = _flat_pair(student, teacher, reduction)
    cos = jnp.sum(l2_normalize(s) * l2_normalize(t), axis=-1)
    return apply_reduction(jnp.square(1.0 - cos), reduction)
