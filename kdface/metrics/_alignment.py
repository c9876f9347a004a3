"""Wang et al. 2017's evaluation of the transfer tasks: alignment NRMSE and nearest-neighbour
verification (Wang et al. 2017 §5.1 "Evaluation").

``nrmse_dataset`` is the NumPy evaluation twin of the differentiable ``kdface.losses.nrmse``: both
call one implementation (``kdface._landmarks``), so definition, options, index parsing and defaults
are the same; here it runs in float64 with failure rate and the cumulative error distribution
added.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kdface._landmarks import landmark_points, per_image_nrmse
from kdface.metrics._topk import chunk_bounds, top_k

NN_METRICS = ("euclidean", "cosine")


def nrmse_dataset(pred: Any, target: Any, *, normalization: str = "inter_ocular",
                  left_eye: int | Sequence[int] = 0, right_eye: int | Sequence[int] = 1,
                  failure_threshold: float = 0.1, ced_max: float = 0.2,
                  ced_points: int = 201) -> dict[str, Any]:
    """Landmark NRMSE over a dataset: per image ``(1/K) Σ_k ||pred_k - target_k||₂ / d``.

    Wang et al. 2017 §5.1 (NRMSE, after its ref. [28], TCNN: mean point-to-point Euclidean error
    normalized by the inter-ocular distance), reported as a fraction (x100 for the paper's %).
    pred, target: [N, K, 2] or interleaved [N, 2K] (x1, y1, x2, y2, ...) in pixels.

    d, from the ground truth only:
    ``'inter_ocular'`` — distance between points ``left_eye`` and ``right_eye`` (ints; the eye
    centres 0 and 1 of the 5-point CelebA/insightface layout, outer eye corners 36 and 45 of the
    68-point layout); ``'inter_pupil'`` — distance between the centroids of the point lists
    ``left_eye`` and ``right_eye``; ``'bbox_diagonal'`` — diagonal of the landmarks' bounding box.

    Returns ``nrmse`` (mean over images), ``per_sample`` [N], ``failure_rate`` (fraction of
    images with error > ``failure_threshold``; 0.1 is the customary 10%), and ``ced``: the
    cumulative error distribution ``{'errors': [ced_points] grid on [0, ced_max], 'fraction':
    fraction of images with error <= each grid value}`` with its normalized area ``ced_auc``.
    Raises ValueError when some image's d is 0 (degenerate ground truth).
    """
    p = _landmarks("pred", pred)
    t = _landmarks("target", target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    if not ced_max > 0 or not failure_threshold > 0 or ced_points < 2:
        raise ValueError("ced_max and failure_threshold must be > 0 and ced_points >= 2")
    with np.errstate(divide="ignore", invalid="ignore"):
        per_sample = per_image_nrmse(np, p, t, normalization=normalization, left_eye=left_eye,
                                     right_eye=right_eye)
    degenerate = ~np.isfinite(per_sample) & np.all(np.isfinite(p), axis=(1, 2))
    if np.any(degenerate):
        bad = np.nonzero(degenerate)[0][:5].tolist()
        raise ValueError(f"the {normalization} distance of the ground truth is 0 for images {bad}")
    grid = np.linspace(0.0, ced_max, ced_points)
    fraction = np.mean(per_sample[None, :] <= grid[:, None], axis=1)
    return {
        "nrmse": float(per_sample.mean()),
        "per_sample": per_sample,
        "failure_rate": float(np.mean(per_sample > failure_threshold)),
        "ced": {"errors": grid, "fraction": fraction},
        "ced_auc": float(np.trapezoid(fraction, grid) / ced_max),
    }


def nearest_neighbour_verification(embeddings: Any, labels: Any, *, metric: str = "euclidean",
                                   skip_singletons: bool = False,
                                   chunk: int = 1024) -> dict[str, Any]:
    """Leave-one-out nearest-neighbour top-1 accuracy on held-out identities.

    Wang et al. 2017 §5.1: "we compute the Euclidean distance between each pair in testing
    samples, and the top1 accuracy is reported based on if a test sample and its nearest sample
    belong to the same identity". embeddings: [N, D] of the test split (identities not seen in
    training); labels: [N] int. Each sample's nearest *other* sample is found; accuracy is the
    fraction whose neighbour shares its label.

    metric: ``'euclidean'`` (the paper's; on the embeddings as given) or ``'cosine'`` (on
    L2-normalized embeddings). Ties go to the lower index. skip_singletons: leave out samples
    whose identity has no other sample (they can never be right); the paper counts every sample.

    Returns ``top1_accuracy``, ``nearest`` [N] (neighbour index), ``correct`` [N] bool,
    ``num_evaluated``, ``num_singletons``.
    """
    x = np.asarray(embeddings)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"embeddings must be a floating-point array, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"embeddings must have shape [N, D] with N >= 2, got {x.shape}")
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"labels must be an integer array of identity ids, got dtype {lab.dtype}")
    if lab.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape [N]=[{x.shape[0]}], got {lab.shape}")
    if metric not in NN_METRICS:
        raise ValueError(f"metric must be one of {NN_METRICS}, got {metric!r}")
    if metric == "cosine":
        _, idx = top_k(x, x, 1, query_chunk=chunk, item_chunk=max(chunk, 16384),
                       exclude_same_index=True)
        nearest = idx[:, 0]
    else:
        nearest = _nearest_euclidean(x.astype(np.float64), chunk)
    correct = lab[nearest] == lab
    _, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    singleton = counts[inverse] == 1
    use = ~singleton if skip_singletons else np.ones_like(singleton)
    return {
        "top1_accuracy": float(np.mean(correct[use])) if use.any() else float("nan"),
        "nearest": nearest,
        "correct": correct,
        "num_evaluated": int(use.sum()),
        "num_singletons": int(singleton.sum()),
    }


def _nearest_euclidean(x: np.ndarray, chunk: int) -> np.ndarray:
    sq = np.einsum("nd,nd->n", x, x)
    nearest = np.empty(x.shape[0], np.int64)
    for q0, q1 in chunk_bounds(x.shape[0], chunk):
        # squared distances up to the per-row constant |q|^2, which does not change the argmin
        d = sq[None, :] - 2.0 * (x[q0:q1] @ x.T)
        rows = np.arange(q0, q1)
        d[rows - q0, rows] = np.inf
        nearest[q0:q1] = np.argmin(d, axis=1)
    return nearest


def _landmarks(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    return landmark_points(name, arr.astype(np.float64))
