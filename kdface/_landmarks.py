"""NRMSE of facial landmarks, written once for the loss (JAX) and the evaluation metric (NumPy).

``kdface.losses.nrmse`` (differentiable, in the inputs' dtype) and
``kdface.metrics.nrmse_dataset`` (float64 on the host, with failure rate and CED) both call
``per_image_nrmse`` with their array library, so the two cannot drift apart.

Eye-index convention (both call sites): ``left_eye`` / ``right_eye`` are Python or NumPy ints
(``'inter_ocular'``) or, for ``'inter_pupil'``, an int or a non-empty sequence of ints (a
``range`` works) whose points are averaged. Bools are rejected; every index must lie in
``[0, K)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

NORMALIZATIONS = ("inter_ocular", "inter_pupil", "bbox_diagonal")


def _is_int(i: Any) -> bool:
    return isinstance(i, (int, np.integer)) and not isinstance(i, bool)


def eye_indices(name: str, value: Any, num_points: int, allow_many: bool) -> tuple[int, ...]:
    """The landmark indices ``value`` names, checked against ``num_points`` (see module doc)."""
    if _is_int(value):
        indices = (int(value),)
    elif allow_many and isinstance(value, Sequence) and len(value) > 0 and all(
            _is_int(i) for i in value):
        indices = tuple(int(i) for i in value)
    else:
        what = "an int or a non-empty sequence of ints" if allow_many else "an int"
        raise TypeError(f"{name} must be {what}, got {value!r}")
    for i in indices:
        if not 0 <= i < num_points:
            raise ValueError(f"{name} index {i} is out of range for K={num_points} landmarks")
    return indices


def landmark_points(name: str, x: Any) -> Any:
    """``[N, K, 2]`` from ``[N, K, 2]`` or interleaved ``[N, 2K]`` (x1, y1, x2, y2, ...)."""
    shape = tuple(np.shape(x))
    if len(shape) == 3 and shape[2] == 2:
        return x
    if len(shape) == 2 and shape[1] % 2 == 0:
        return x.reshape(shape[0], shape[1] // 2, 2)
    raise ValueError(f"{name} must have shape [N, K, 2] or [N, 2K], got {shape}")


def per_image_nrmse(xp: ModuleType, pred: Any, target: Any, *, normalization: str,
                    left_eye: int | Sequence[int], right_eye: int | Sequence[int]) -> Any:
    """``[N]`` errors ``(1/K) Σ_k ||pred_k - target_k||₂ / d``, computed with ``xp`` (``numpy``
    or ``jax.numpy``).

    pred, target: ``[N, K, 2]`` of one float dtype. d comes from the ground truth only:
    ``'inter_ocular'`` the distance between points ``left_eye`` and ``right_eye``;
    ``'inter_pupil'`` between the centroids of those point lists; ``'bbox_diagonal'`` the
    diagonal of the landmarks' bounding box. An image with d = 0 gives inf/NaN.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    diff = pred - target
    sq = xp.sum(diff * diff, axis=-1)
    positive = sq > 0.0
    # sqrt's gradient at 0 is inf; the double where keeps the loss's gradient finite there
    point_error = xp.where(positive, xp.sqrt(xp.where(positive, sq, 1.0)), 0.0)
    if normalization == "bbox_diagonal":
        gap = xp.max(target, axis=1) - xp.min(target, axis=1)
    else:
        many = normalization == "inter_pupil"
        num_points = target.shape[1]
        left = np.asarray(eye_indices("left_eye", left_eye, num_points, many))
        right = np.asarray(eye_indices("right_eye", right_eye, num_points, many))
        gap = xp.mean(target[:, left, :], axis=1) - xp.mean(target[:, right, :], axis=1)
    norm = xp.sqrt(xp.sum(gap * gap, axis=-1))
    return xp.mean(point_error, axis=-1) / norm
