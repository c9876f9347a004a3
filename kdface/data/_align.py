"""5-point similarity alignment to the standard 112x112 / 112x96 face crops.

The papers train and test on faces aligned by a similarity transform (rotation, uniform scale,
translation) that maps five detected landmarks onto a fixed template, the crop insightface and
SphereFace use (Wang et al. 2019 §2.2: "MTCNN ... align the face region as 112 x 96"). Landmark
order, in image coordinates (x right, y down): the eye on the image's left, the eye on the
image's right, the nose tip, the left mouth corner, the right mouth corner.
"""
from __future__ import annotations

import csv
import os

import cv2
import numpy as np

from kdface.data._images import check_image

__all__ = [
    "TEMPLATE_112",
    "align_face",
    "face_template",
    "read_landmarks_csv",
    "similarity_transform",
]

TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]],
    dtype=np.float64,
)
_INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR,
                   "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}


def _points(points, name: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 2:
        raise ValueError(f"{name} must be [K, 2] with K >= 2 points, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{name} must be finite")
    return points


def face_template(output_size=(112, 112)) -> np.ndarray:
    """The 5-point template ``[5, 2]`` (x, y) for a crop of ``output_size = (height, width)``.

    ``(112, 112)`` is insightface's template; ``(112, 96)`` subtracts 8 from x (SphereFace's
    crop). Other sizes scale the 112x112 template by ``height / 112`` and centre it
    horizontally, which reproduces both of those (our generalization).
    """
    height, width = _size(output_size)
    scale = height / 112.0
    template = TEMPLATE_112 * scale
    template[:, 0] += (width - 112.0 * scale) / 2.0
    return template


def _size(output_size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in output_size)
    except (TypeError, ValueError):
        raise ValueError(f"output_size must be (height, width), got {output_size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return height, width


def similarity_transform(src_points, dst_points) -> np.ndarray:
    """Least-squares similarity transform ``[2, 3]`` taking ``src_points`` to ``dst_points``.

    ``src_points``, ``dst_points``: ``[K, 2]`` (x, y). Returns ``M`` (float64) minimizing
    ``sum_k ||M @ [x_k, y_k, 1] - dst_k||^2`` over ``s * R`` (``R`` a rotation, no reflection)
    plus translation: Umeyama (1991), eqs. (34)-(42). Usable directly with ``cv2.warpAffine``.
    """
    src, dst = _points(src_points, "src_points"), _points(dst_points, "dst_points")
    if src.shape != dst.shape:
        raise ValueError(f"src_points {src.shape} and dst_points {dst.shape} must match")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("src_points are all (nearly) the same point; no transform is defined")
    cov = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(cov)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map would be a reflection
        signs[1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def align_face(image, landmarks, *, output_size=(112, 112), template=None,
               interpolation: str = "bilinear", border_value: int = 0) -> np.ndarray:
    """Warps a face so its 5 landmarks land on the template.

    ``image``: uint8 ``[H, W, 3]``; ``landmarks``: ``[5, 2]`` (x, y) in ``image`` pixels
    (order in the module docstring); ``output_size``: ``(height, width)``, ``(112, 112)`` or
    ``(112, 96)`` for the papers' crops; ``template``: ``[5, 2]`` to override
    :func:`face_template`. Returns uint8 ``[height, width, 3]``; outside pixels are
    ``border_value``.
    """
    image = check_image(image)
    height, width = _size(output_size)
    landmarks = _points(landmarks, "landmarks")
    target = face_template((height, width)) if template is None else _points(template, "template")
    if landmarks.shape != target.shape:
        raise ValueError(f"landmarks {landmarks.shape} must match the template {target.shape}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
    matrix = similarity_transform(landmarks, target)
    return cv2.warpAffine(image, matrix, (width, height), flags=_INTERPOLATIONS[interpolation],
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(border_value,) * 3)


def read_landmarks_csv(path) -> dict[str, np.ndarray]:
    """Reads landmarks kept beside the images: ``{filename: float32 [5, 2]}``.

    The CSV has the header ``filename,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5`` (extra columns are
    ignored) and one row per image; ``filename`` is as written (typically relative to the CSV's
    folder), points in the module docstring's order, in pixels of the original image.
    """
    path = os.fspath(path)
    columns = ["filename"] + [f"{axis}{k}" for k in range(1, 6) for axis in "xy"]
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: header needs columns {columns}; missing {missing}")
        reader.fieldnames = header
        for row_no, row in enumerate(reader, 2):
            try:
                values = [float(row[c]) for c in columns[1:]]
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{row_no}: coordinates must be numbers: {row}") from None
            name = row["filename"].strip()
            if name in out:
                raise ValueError(f"{path}:{row_no}: {name!r} appears twice")
            out[name] = np.asarray(values, dtype=np.float32).reshape(5, 2)
    return out
