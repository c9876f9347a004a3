"""Task losses of Wang et al. 2017: triplet loss (verification) and landmark regression (alignment).

The paper's equations were lost from its text; what survives fixes the families: verification
trains with the triplet loss of FaceNet (its ref. [22], eq. (8)) and alignment regresses
landmarks with a Euclidean loss (eq. (6)) evaluated by NRMSE (its ref. [28], TCNN). The open
details are settled by those references and written in each docstring.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kdface._landmarks import NORMALIZATIONS, landmark_points, per_image_nrmse
from kdface._math import l2_normalize
from kdface.losses._checks import (check_embeddings, check_float, check_labels, check_option,
                                   check_same_shape, compute_dtype)
from kdface.losses._classification import REDUCTIONS, apply_reduction

MININGS = ("batch_all", "batch_hard")
DISTANCES = ("squared_euclidean", "euclidean", "cosine")
AVERAGES = ("active", "valid")


def _pairwise_distances(x: jax.Array, distance: str) -> jax.Array:
    """``[N, N]`` distances between the rows of ``x`` with an exactly zero diagonal."""
    n = x.shape[0]
    eye = jnp.eye(n, dtype=bool)
    if distance == "cosine":
        u = l2_normalize(x)
        gram = jnp.matmul(u, u.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.where(eye, 0.0, 1.0 - gram)
    gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    sq_norms = jnp.diagonal(gram)
    # The Gram expansion can go slightly negative by cancellation; distances are >= 0.
    d2 = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram, 0.0)
    d2 = jnp.where(eye, 0.0, d2)
    if distance == "squared_euclidean":
        return d2
    # sqrt has an infinite derivative at 0 (coincident embeddings): take it as 0 there.
    positive = d2 > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, d2, 1.0)), 0.0)


def triplet_loss(embeddings: jax.Array, labels: jax.Array, *, margin: float = 0.2,
                 mining: str = "batch_all", distance: str = "squared_euclidean",
                 normalize: bool = True, average_over: str = "active") -> jax.Array:
    """Triplet loss over the triplets of one batch, ``[d(a, p) - d(a, n) + margin]_+``.

    Wang et al. 2017 eq. (8), the FaceNet triplet loss (its ref. [22]): anchor a and positive p
    share an identity, the negative n does not. Triplets are formed inside the batch:

    * ``mining='batch_all'``: every valid triplet (a, p, n) with a != p. With
      ``average_over='active'`` (default) the sum is divided by the number of triplets whose
      loss is > 0 (Hermans et al.'s "batch all, ≠0" average, which keeps easy triplets from
      diluting the gradient); ``'valid'`` divides by the number of valid triplets.
      Memory is O(N³).
    * ``mining='batch_hard'``: per anchor, its farthest positive and nearest negative; the mean
      over anchors that have both (Hermans et al.'s batch hard). ``average_over`` is ignored.

    Anchors without a positive or a negative contribute nothing; with no valid triplet at all the
    loss is 0. The defaults (L2-normalized embeddings, squared Euclidean distance, margin 0.2)
    are FaceNet's; the paper's own margin value did not survive in its text.

    Args:
      embeddings: ``[N, D]`` float.
      labels: ``[N]`` int identity ids (any integers; only equality matters).
      margin: the margin α >= 0.
      mining: ``'batch_all'`` or ``'batch_hard'``.
      distance: ``'squared_euclidean'``, ``'euclidean'`` or ``'cosine'`` (``1 - cos``).
      normalize: L2-normalize the embeddings first (``'cosine'`` is scale-free anyway).
      average_over: ``'active'`` or ``'valid'``, see above.

    Returns:
      scalar (float32 for half-precision inputs).
    """
    check_embeddings("embeddings", embeddings)
    check_labels("labels", labels, embeddings.shape[0])
    check_option("mining", mining, MININGS)
    check_option("distance", distance, DISTANCES)
    check_option("average_over", average_over, AVERAGES)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
        raise ValueError(f"margin must be a Python number >= 0, got {margin!r}")
    x = embeddings.astype(compute_dtype(embeddings))
    if normalize:
        x = l2_normalize(x)
    d = _pairwise_distances(x, distance)
    n = x.shape[0]
    same = labels[:, None] == labels[None, :]
    positive_pair = same & ~jnp.eye(n, dtype=bool)
    negative_pair = ~same
    if mining == "batch_all":
        valid = positive_pair[:, :, None] & negative_pair[:, None, :]
        hinge = jax.nn.relu(d[:, :, None] - d[:, None, :] + margin)
        losses = jnp.where(valid, hinge, 0.0)
        if average_over == "active":
            count = jnp.sum(valid & (hinge > 0.0))
        else:
            count = jnp.sum(valid)
        return jnp.sum(losses) / jnp.maximum(count, 1).astype(x.dtype)
    has_both = jnp.any(positive_pair, axis=1) & jnp.any(negative_pair, axis=1)
    hardest_pos = jnp.max(jnp.where(positive_pair, d, -jnp.inf), axis=1)
    hardest_neg = jnp.min(jnp.where(negative_pair, d, jnp.inf), axis=1)
    # Anchors lacking either side hold ±inf; replace them before the arithmetic so neither the
    # value nor the gradient sees inf - inf.
    hardest_pos = jnp.where(has_both, hardest_pos, 0.0)
    hardest_neg = jnp.where(has_both, hardest_neg, 0.0)
    per_anchor = jnp.where(has_both, jax.nn.relu(hardest_pos - hardest_neg + margin), 0.0)
    count = jnp.maximum(jnp.sum(has_both), 1).astype(x.dtype)
    return jnp.sum(per_anchor) / count


def _landmarks(name: str, x: Any) -> jax.Array:
    check_float(name, x)
    return landmark_points(name, x)


def landmark_l2_loss(pred: jax.Array, target: jax.Array, *,
                     reduction: str | None = "mean") -> jax.Array:
    """Landmark regression loss ``1/2 Σ_k ||pred_k - target_k||²`` per example.

    Wang et al. 2017 eq. (6), the "Euclidean loss" of landmark regression. The formula did not
    survive in the paper's text; this is the Caffe ``EuclideanLoss`` the term names,
    ``1/(2N) Σ_n ||pred_n - target_n||²`` with the default batch mean (note the 1/2). The
    same function serves as the hidden-layer distillation term of eq. (7) with
    ``target`` = the teacher's (frozen) output.

    Args:
      pred: ``[N, K, 2]`` or interleaved ``[N, 2K]`` float coordinates.
      target: same shape as ``pred``.
      reduction: ``'mean'`` over the batch (default), ``'sum'``, or ``None``/``'none'``.

    Returns:
      scalar, or ``[N]``.
    """
    check_float("pred", pred)
    check_float("target", target)
    check_same_shape("pred", pred, "target", target)
    check_option("reduction", reduction, REDUCTIONS)
    dtype = compute_dtype(pred, target)
    p = _landmarks("pred", pred).astype(dtype)
    t = _landmarks("target", target).astype(dtype)
    diff = p - t
    return apply_reduction(0.5 * jnp.sum(diff * diff, axis=(1, 2)), reduction)


def nrmse(pred: jax.Array, target: jax.Array, *, normalization: str = "inter_ocular",
          left_eye: int | Sequence[int] = 0, right_eye: int | Sequence[int] = 1,
          reduction: str | None = "mean") -> jax.Array:
    """Normalized landmark error: ``(1/K) Σ_k ||pred_k - target_k||₂ / d`` per image.

    The alignment metric of Wang et al. 2017 (Sec. 5.1, "NRMSE", after its ref. [28], TCNN):
    the mean over the K points of the Euclidean point error, divided by a normalizing distance
    d of the ground truth, then averaged over images. Returned as a fraction (tables print it
    x100, in %). d is:

    * ``'inter_ocular'`` (default, TCNN's choice): the distance between the ground-truth points
      ``left_eye`` and ``right_eye`` (ints). For 5-point CelebA/insightface layouts these are
      the eye centres 0 and 1; for the 68-point layout, the outer eye corners 36 and 45.
    * ``'inter_pupil'``: the distance between the centroids of the ground-truth points listed in
      ``left_eye`` and ``right_eye`` (ints or sequences; 68-point: ``range(36, 42)`` and
      ``range(42, 48)``).
    * ``'bbox_diagonal'``: the diagonal of the ground-truth landmarks' bounding box.

    An image whose d is 0 gives inf/NaN; the caller must not pass degenerate ground truth.

    Args:
      pred: ``[N, K, 2]`` or interleaved ``[N, 2K]`` float coordinates.
      target: same shape as ``pred``.
      normalization: see above.
      left_eye, right_eye: landmark indices, see above (ints; sequences of ints for
        ``'inter_pupil'``; the same parser as ``kdface.metrics.nrmse_dataset``).
      reduction: ``'mean'`` over images (default), ``'sum'``, or ``None``/``'none'``.

    Returns:
      scalar, or ``[N]`` per-image errors.
    """
    check_float("pred", pred)
    check_float("target", target)
    check_same_shape("pred", pred, "target", target)
    check_option("normalization", normalization, NORMALIZATIONS)
    check_option("reduction", reduction, REDUCTIONS)
    dtype = compute_dtype(pred, target)
    p = _landmarks("pred", pred).astype(dtype)
    t = _landmarks("target", target).astype(dtype)
    per_image = per_image_nrmse(jnp, p, t, normalization=normalization, left_eye=left_eye,
                                right_eye=right_eye)
    return apply_reduction(per_image, reduction)
