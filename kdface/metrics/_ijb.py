"""IJB-B / IJB-C 1:1 template verification: TAR at FAR 1e-6 ... 1e-1, as insightface computes it.

IJB-B (Whitelam et al., IARPA Janus Benchmark-B Face Dataset, CVPR Workshops 2017) and IJB-C
(Maze et al., IARPA Janus Benchmark - C: Face Dataset and Protocol, ICB 2018) compare
*templates* (sets of still images and video frames of one subject) rather than images. The
numbers every face-recognition paper reports (ShrinkTeaNet among them: Duong et al.,
ShrinkTeaNet: Million-scale Lightweight Face Recognition via Shrinking Teacher-Student Networks,
2019) are those of insightface's evaluation script (``recognition/arcface_torch/eval_ijbc.py``,
``recognition/_evaluation_/ijb/ijb_11.py``), whose rules are followed here step by step:

1. Image features (float32 ``[N, D]``): with flip, the embedding of the aligned crop plus that of
   its mirror image (their "F2"); multiplied by the detector's face score (their "D1"); the norm
   is kept (their "N1"; ``keep_norm=False`` divides each feature by its norm first).
2. :func:`template_features`: per template (ascending id), the images of each media (ascending
   id) are averaged (a single image is used as is), the media features are summed, and the sum is
   L2-normalized (sklearn's ``normalize`` rule).
3. :func:`template_pair_scores`: the cosine of the two templates of each listed pair.
4. :func:`binary_roc_curve`: sklearn's ``roc_curve(labels, scores)`` (collinear points dropped,
   ``drop_intermediate=True``), and :func:`tar_at_far_nearest`: for each target FAR the TAR at the
   ROC point whose FPR is *nearest* the target (ties to the larger TPR), which may lie above the
   target; the FPR of that point is returned beside it.

float32 arithmetic is kept where insightface's script works in float32 (features, media means and
sums), so the scores are its floats.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kdface.metrics._verification import l2_normalize

__all__ = ["IJB_FAR_TARGETS", "binary_roc_curve", "ijb_image_features", "ijb_verification",
           "tar_at_far_nearest", "template_features", "template_pair_scores"]

IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def ijb_image_features(emb_image: Any, emb_flipped: Any = None, face_scores: Any = None, *,
                       keep_norm: bool = True) -> np.ndarray:
    """Step 1: float32 ``[N, D]`` image features from network outputs.

    emb_image: [N, D] embeddings of the aligned crops; emb_flipped: [N, D] of their mirror
    images, added when given (flip); face_scores: [N] detector scores (the last column of
    ``*_name_5pts_score.txt``), multiplying each feature when given; ``keep_norm=False`` divides
    each feature by its L2 norm before the score is applied.
    """
    feats = _matrix("emb_image", emb_image).astype(np.float32)
    if emb_flipped is not None:
        other = _matrix("emb_flipped", emb_flipped).astype(np.float32)
        if other.shape != feats.shape:
            raise ValueError(f"emb_flipped {other.shape} must match emb_image {feats.shape}")
        feats = feats + other
    if not keep_norm:
        feats = feats / np.sqrt(np.sum(feats ** 2, -1, keepdims=True))
    if face_scores is not None:
        scores = np.asarray(face_scores, dtype=np.float32)
        if scores.shape != (feats.shape[0],):
            raise ValueError(f"face_scores must be [N]=[{feats.shape[0]}], got {scores.shape}")
        feats = feats * scores[:, np.newaxis]
    return feats


def template_features(image_feats: Any, templates: Any,
                      medias: Any) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: ``(template_feats [T, D] float64 unit rows, unique_templates [T] ascending)``.

    image_feats: [N, D]; templates, medias: [N] integer ids of each image's template and media.
    For each template the features of each of its media are averaged (``np.mean`` in the
    features' dtype; one image is used as is), the media features are summed, and the sum is
    normalized.
    """
    feats = _matrix("image_feats", image_feats)
    templates = _ids("templates", templates, feats.shape[0])
    medias = _ids("medias", medias, feats.shape[0])
    unique_templates = np.unique(templates)
    out = np.zeros((unique_templates.size, feats.shape[1]))
    for row, template in enumerate(unique_templates):
        (in_template,) = np.nonzero(templates == template)
        t_feats, t_medias = feats[in_template], medias[in_template]
        media_feats = []
        for media, count in zip(*np.unique(t_medias, return_counts=True)):
            (in_media,) = np.nonzero(t_medias == media)
            media_feats.append(t_feats[in_media] if count == 1 else
                               np.mean(t_feats[in_media], axis=0, keepdims=True))
        out[row] = np.sum(np.array(media_feats), axis=0)[0]
    return l2_normalize(out), unique_templates


def template_pair_scores(template_feats: Any, unique_templates: Any, template1: Any,
                         template2: Any) -> np.ndarray:
    """Step 3: cosine score ``[P]`` of each template pair ``(template1[i], template2[i])``.

    Raises ValueError naming a pair's template that has no images (insightface's script would
    silently score it as the first template)."""
    feats = np.asarray(template_feats, dtype=np.float64)
    known = np.asarray(unique_templates)
    t1 = np.asarray(template1).astype(np.int64)
    t2 = np.asarray(template2).astype(np.int64)
    if t1.shape != t2.shape or t1.ndim != 1:
        raise ValueError(f"template1 and template2 must be [P] alike, got {t1.shape}, {t2.shape}")
    rows = []
    for t in (t1, t2):
        pos = np.searchsorted(known, t)
        missing = (pos >= known.size) | (known[np.minimum(pos, known.size - 1)] != t)
        if missing.any():
            raise ValueError(f"template {int(t[missing][0])} of the pair list has no images in "
                             f"the template/media list ({int(missing.sum())} pair ends missing)")
        rows.append(pos)
    return np.sum(feats[rows[0]] * feats[rows[1]], -1)


def binary_roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of sklearn's ``roc_curve(labels, scores)`` (its default
    ``drop_intermediate=True``), the same arrays, in NumPy (kdface does not depend on sklearn).

    Pairs are sorted by descending score (stable); one point per distinct score; points where
    both the false- and the true-positive counts have zero second difference (collinear
    neighbours) are dropped; ``(0, 0)`` with threshold ``inf`` is prepended.
    """
    y = _labels(labels)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} must match labels {y.shape}")
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[last]
    fps = 1 + last - tps
    thresholds = s[last]
    if fps.size > 2:
        keep = np.nonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def tar_at_far_nearest(fpr: Any, tpr: Any,
                       far_targets: Sequence[float] = IJB_FAR_TARGETS) -> dict[float, tuple]:
    """Step 4: ``{far: (tar, fpr_used)}``: the TAR of the ROC point whose FPR is nearest ``far``.

    insightface reverses the curve (so that among points of one FPR the larger TPR comes first)
    and takes the first point of least ``|fpr - far|``; the same rule here. ``fpr_used`` may
    exceed ``far`` (the nearest point can lie on either side).
    """
    f = np.flipud(np.asarray(fpr, dtype=np.float64))
    t = np.flipud(np.asarray(tpr, dtype=np.float64))
    out = {}
    for far in far_targets:
        i = int(np.argmin(np.abs(f - float(far))))  # argmin: the first of the least
        out[float(far)] = (float(t[i]), float(f[i]))
    return out


def ijb_verification(image_feats: Any, templates: Any, medias: Any, template1: Any,
                     template2: Any, labels: Any, *,
                     far_targets: Sequence[float] = IJB_FAR_TARGETS) -> dict[str, Any]:
    """Steps 2-4 on image features (:func:`ijb_image_features`).

    image_feats: [N, D]; templates, medias: [N] ids; template1, template2, labels: [P] pairs
    (label 1 = same subject). Returns ``tar_at_far`` {far: TAR}, ``fpr_at_far`` {far: FPR of the
    point used}, ``auc`` (trapezoids on the ROC, as ``sklearn.metrics.auc``), ``roc``
    {fpr, tpr, thresholds}, ``scores`` [P], and the counts ``num_images``, ``num_templates``,
    ``num_pairs``, ``num_positive``, ``num_negative``.
    """
    y = _labels(labels)
    feats, unique_templates = template_features(image_feats, templates, medias)
    scores = template_pair_scores(feats, unique_templates, template1, template2)
    if scores.shape != y.shape:
        raise ValueError(f"{scores.size} template pairs but {y.size} labels")
    if y.all() or not y.any():
        raise ValueError("the pair list needs both genuine (1) and impostor (0) pairs")
    fpr, tpr, thresholds = binary_roc_curve(y, scores)
    picked = tar_at_far_nearest(fpr, tpr, far_targets)
    return {
        "tar_at_far": {f: v[0] for f, v in picked.items()},
        "fpr_at_far": {f: v[1] for f, v in picked.items()},
        "auc": float(np.trapezoid(tpr, fpr)),
        "roc": {"fpr": fpr, "tpr": tpr, "thresholds": thresholds},
        "scores": scores,
        "num_images": int(np.asarray(templates).shape[0]),
        "num_templates": int(unique_templates.size),
        "num_pairs": int(y.size),
        "num_positive": int(y.sum()),
        "num_negative": int((~y).sum()),
    }


def _matrix(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating) or arr.ndim != 2:
        raise ValueError(f"{name} must be a float [N, D] array, got {arr.dtype} {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _ids(name: str, x: Any, n: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer ids [N]=[{n}], got {arr.dtype} {arr.shape}")
    return arr


def _labels(labels: Any) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (arr.dtype == bool or np.isin(arr, (0, 1)).all()):
        raise ValueError(f"labels must be [P] of 0/1 (1 = same subject), got {arr.dtype} "
                         f"{arr.shape}")
    return arr.astype(bool)
