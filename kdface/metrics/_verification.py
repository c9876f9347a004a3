"""Pair verification: the 10-fold LFW protocol, best-threshold accuracy, ROC/AUC and TAR@FAR.

Used for LFW, CFP-FP, AgeDB-30, CALFW, CPLFW (Nikitin et al. 2020 §4.1: "verification accuracy,
estimated on 10-fold cross validation") and for the low-resolution LFW protocol of Wang et al. 2019
§3.1 (gallery image kept, probe image degraded to 8/12/16/20 px: call :func:`verification` once
per probe size with ``emb1`` from the HR images and ``emb2`` from the degraded ones).

Score convention (a choice; accuracy does not depend on it): the score of pair i is the cosine
similarity ``s_i = <e1_i, e2_i>`` of the L2-normalized embeddings, and a pair is predicted "same"
when ``s_i > t``. insightface thresholds the squared distance instead, predicting "same" when
``d_i < t_d`` with ``d_i = |e1_i - e2_i|^2 = 2 - 2 s_i``; the two rules coincide for
``t = 1 - t_d / 2``, so every partition of the pairs one rule can make, the other can make too.

Two protocols (``verification(..., protocol=...)``), both with sklearn ``KFold(shuffle=False)``
folds (:func:`fold_bounds`):

* ``'exact'`` (kdface's default): thresholds chosen among every distinct split of the training
  scores, TAR@FAR at the exact (k+1)-th training negative (:func:`far_threshold`).
* ``'insightface'``: the numbers of insightface's ``recognition/arcface_torch/eval/verification.py``
  to the last digit: accuracy with the squared-distance grid ``np.arange(0, 4, 0.01)``
  (``calculate_roc``), VAL@FAR with the threshold interpolated on the grid
  ``np.arange(0, 4, 0.001)`` by scipy's ``interp1d(far_train, thresholds, kind='slinear')``
  (``calculate_val``; :func:`slinear_interpolate` is that rule in NumPy, as scipy <= 1.8
  computed it: later scipy refuses the table and the script fails). On a coarse grid two
  pairs whose distances fall in one grid cell cannot be split, and with tied training negatives
  the interpolated threshold can admit far more than the target FAR; the exact protocol has
  neither effect, which is why it is the default.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
PROTOCOLS = ("exact", "insightface")
# insightface verification.py evaluate(): the accuracy grid and the VAL@FAR grid of squared
# distances (the same np.arange calls, so the grid points are the same floats).
INSIGHTFACE_ACCURACY_GRID = np.arange(0, 4, 0.01)
INSIGHTFACE_VAL_GRID = np.arange(0, 4, 0.001)


def l2_normalize(x: Any, *, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x: [N, D]`` scaled to unit L2 norm, in float64; a row of norm < eps stays as is.

    The norm is ``sqrt(einsum('ij,ij->i', x, x))``, the operation order of
    ``sklearn.preprocessing.normalize`` (which insightface applies), so the rows are the same
    floats as insightface's. It is deliberately not ``kdface._math.l2_normalize`` (the
    training-side rule, ``x / max(||x||, eps)`` in the input's dtype): verification accuracies
    are compared digit for digit with insightface's, which needs scikit-learn's exact rule.
    """
    x = np.asarray(x, dtype=np.float64)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x / np.where(norm < eps, 1.0, norm)


def embeddings_with_flip(emb_image: Any, emb_flipped: Any) -> np.ndarray:
    """The "image + flipped image" embedding: ``normalize(emb_image + emb_flipped)``.

    emb_image, emb_flipped: [N, D] embeddings of the images and of their horizontal mirrors.
    Returns [N, D] float64 with unit rows. The two are summed as given (not normalized first),
    as insightface's verification script does for its "flip" option.
    """
    a = _float_matrix("emb_image", emb_image)
    b = _float_matrix("emb_flipped", emb_flipped)
    if a.shape != b.shape:
        raise ValueError(f"emb_image and emb_flipped must have the same shape [N, D], "
                         f"got {a.shape} and {b.shape}")
    return l2_normalize(a.astype(np.float64) + b.astype(np.float64))


def split_interleaved(embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    """Splits interleaved pair embeddings ``[2P, D]`` (rows 2i, 2i+1 = pair i) into two [P, D].

    This is the layout of insightface ``.bin`` files (``bins[2i]``, ``bins[2i+1]``).
    """
    x = _float_matrix("embeddings", embeddings)
    if x.shape[0] % 2:
        raise ValueError(f"interleaved pair embeddings need an even number of rows [2P, D], "
                         f"got {x.shape[0]} rows")
    return x[0::2], x[1::2]


def fold_bounds(num_pairs: int, folds: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` blocks in file order, sized like sklearn ``KFold``.

    The first ``num_pairs % folds`` folds hold one extra pair, as in ``KFold(shuffle=False)``
    which insightface uses; for LFW's 6000 pairs the blocks are the 10 sets of pairs.txt.
    """
    _check_folds(folds, num_pairs)
    base, extra = divmod(num_pairs, folds)
    bounds, start = [], 0
    for k in range(folds):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def pair_scores(emb1: Any, emb2: Any) -> np.ndarray:
    """Cosine similarity of each pair: ``emb1, emb2: [P, D]`` -> ``[P]`` float64."""
    a = _float_matrix("emb1", emb1)
    b = _float_matrix("emb2", emb2)
    if a.shape != b.shape:
        raise ValueError(f"emb1 and emb2 must have the same shape [P, D], "
                         f"got {a.shape} and {b.shape}")
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=1)


def threshold_candidates(scores: np.ndarray) -> np.ndarray:
    """Exact threshold candidates for the rule ``score > t``, ascending.

    The midpoints between consecutive distinct sorted scores, plus ``min - 1`` (accept all) and
    ``max + 1`` (accept none): every distinct split of the scores is reached by exactly one.
    """
    u = np.unique(np.asarray(scores, dtype=np.float64))
    if u.size == 0:
        return np.zeros((1,))
    return np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1.0]])


def best_threshold(scores: np.ndarray, issame: np.ndarray,
                   candidates: np.ndarray) -> tuple[float, float]:
    """``(threshold, accuracy)`` maximizing the accuracy of ``score > t`` over ``candidates``.

    Ties go to the largest (strictest) threshold, as insightface's ``argmax`` over an ascending
    distance grid does.
    """
    acc = _accuracy_at(scores, issame, candidates)
    best = acc.size - 1 - int(np.argmax(acc[::-1]))
    return float(candidates[best]), float(acc[best])


def far_threshold(negative_scores: np.ndarray, far: float) -> float:
    """Threshold at which at most ``floor(far * n)`` of the n negatives satisfy ``score > t``.

    This is the score of the (k+1)-th highest negative, k = floor(far * n): the limit of
    insightface's ``interp1d(far_train, thresholds)`` on a fine grid, where the interpolated
    threshold lands inside the grid gap at which the training FAR steps past the target. With tied
    negatives fewer than k may be accepted; with k >= n every score is accepted.
    """
    neg = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    k = math.floor(far * neg.size + 1e-9)
    if k >= neg.size:
        return float(neg[-1] - 1.0) if neg.size else 0.0
    return float(neg[k])


def roc_curve(scores: Any, issame: Any) -> dict[str, np.ndarray]:
    """Exact ROC over all pairs: ``fpr[i], tpr[i]`` are the rates of ``score >= thresholds[i]``.

    scores: [P]; issame: [P] bool. ``thresholds`` are the distinct scores, descending, after a
    leading ``+inf`` (the point (0, 0)); the curve ends at (1, 1).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(issame, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1] if s.size else np.zeros(0, int)
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(~y)[last_of_run]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = np.r_[0.0, tp / n_pos] if n_pos else np.full(tp.size + 1, np.nan)
    fpr = np.r_[0.0, fp / n_neg] if n_neg else np.full(fp.size + 1, np.nan)
    return {"fpr": fpr, "tpr": tpr, "thresholds": np.r_[np.inf, s[last_of_run]]}


def auc(scores: Any, issame: Any) -> float:
    """Area under the exact ROC (trapezoids): P(positive score > negative score) + 0.5 P(tie).

    1.0 when every positive outscores every negative, 0.0 when every negative outscores every
    positive, NaN when either class is empty.
    """
    roc = roc_curve(scores, issame)
    if np.isnan(roc["fpr"]).any() or np.isnan(roc["tpr"]).any():
        return float("nan")
    return float(np.trapezoid(roc["tpr"], roc["fpr"]))


def verification(emb1: Any, emb2: Any, issame: Any, *, folds: int = 10,
                 far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
                 thresholds: Any = None, protocol: str = "exact") -> dict[str, Any]:
    """The standard k-fold face verification protocol on pair embeddings.

    protocol: ``'exact'`` (below) or ``'insightface'`` (:func:`insightface_verification`: the
    numbers of insightface's verification script, thresholds on squared distances; the
    returned dict has the same keys).

    emb1, emb2: [P, D] embeddings of the two images of each pair (L2-normalized here; for the
    image+flip option pass :func:`embeddings_with_flip` outputs). issame: [P] bool (or 0/1 int).

    Fold k is the k-th contiguous block of pairs in file order (:func:`fold_bounds`). For each
    fold the threshold maximizing accuracy on the other folds is applied to fold k
    (Nikitin et al. 2020 §4.1, insightface ``calculate_roc``). Threshold candidates: the exact
    :func:`threshold_candidates` of the training scores, or the given ``thresholds`` ([T] cosine
    thresholds; insightface's distance grid ``np.arange(0, 4, 0.01)`` is ``1 - grid / 2``).

    TAR@FAR (insightface ``calculate_val``): per fold, the threshold admitting a fraction ``far``
    of the training negatives (:func:`far_threshold`) is applied to the test fold; TAR and the
    achieved FAR are averaged over folds (folds without test positives are left out of the TAR
    mean). A target is *unsupported* when some fold has fewer than ``1 / far`` training
    negatives, i.e. not even one false accept could be allowed: its TAR is ``None`` and it is
    listed in ``tar_at_far_unsupported``.

    Returns a dict: ``accuracy`` (mean over folds), ``accuracy_std`` (population std, as
    insightface), ``fold_accuracies`` [folds], ``threshold`` (mean of per-fold thresholds),
    ``fold_thresholds``, ``best_threshold_accuracy`` and ``best_threshold`` (one threshold chosen
    on all pairs), ``auc``, ``roc`` (:func:`roc_curve` on all pairs), ``tar_at_far`` {far: TAR or
    None}, ``tar_at_far_std``, ``far_achieved`` {far: mean test FAR}, ``tar_at_far_unsupported``,
    counts ``num_pairs``/``num_positive``/``num_negative`` and ``score='cosine'``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "insightface":
        if thresholds is not None:
            raise ValueError("protocol='insightface' uses insightface's own threshold grids; "
                             "custom thresholds apply to protocol='exact' only")
        return insightface_verification(emb1, emb2, issame, folds=folds,
                                        far_targets=far_targets)
    scores = pair_scores(emb1, emb2)
    same = _check_issame(issame, scores.shape[0])
    bounds = fold_bounds(scores.shape[0], folds)
    far_targets = _check_far_targets(far_targets)
    grid = None if thresholds is None else _check_thresholds(thresholds)

    fold_acc, fold_thr = [], []
    tars = {f: [] for f in far_targets}
    fars = {f: [] for f in far_targets}
    min_train_neg = scores.shape[0]
    for start, stop in bounds:
        test = np.zeros(scores.shape[0], bool)
        test[start:stop] = True
        s_tr, y_tr, s_te, y_te = scores[~test], same[~test], scores[test], same[test]
        cands = threshold_candidates(s_tr) if grid is None else grid
        t, _ = best_threshold(s_tr, y_tr, cands)
        fold_thr.append(t)
        fold_acc.append(float(np.mean((s_te > t) == y_te)))
        neg_tr = s_tr[~y_tr]
        min_train_neg = min(min_train_neg, neg_tr.size)
        for f in far_targets:
            t_far = far_threshold(neg_tr, f)
            n_pos, n_neg = int(y_te.sum()), int((~y_te).sum())
            tars[f].append(np.sum(s_te[y_te] > t_far) / n_pos if n_pos else np.nan)
            fars[f].append(np.sum(s_te[~y_te] > t_far) / n_neg if n_neg else np.nan)

    unsupported = [f for f in far_targets if f * min_train_neg + 1e-9 < 1.0]
    tar_at_far, tar_std, far_achieved = {}, {}, {}
    for f in far_targets:
        ok = f not in unsupported and not np.all(np.isnan(tars[f]))
        tar_at_far[f] = float(np.nanmean(tars[f])) if ok else None
        tar_std[f] = float(np.nanstd(tars[f])) if ok else None
        far_achieved[f] = float(np.nanmean(fars[f])) if ok else None

    all_cands = threshold_candidates(scores) if grid is None else grid
    best_t, best_acc = best_threshold(scores, same, all_cands)
    return _protocol_result(fold_acc, fold_thr, best_acc, best_t, scores, same, tar_at_far,
                            tar_std, far_achieved, unsupported, score="cosine", protocol="exact")


def slinear_interpolate(x: Any, y: Any, at: float) -> float:
    """scipy ``interp1d(x, y, kind='slinear')(at)``, the same floats, in NumPy.

    insightface interpolates its FAR -> threshold table this way. interp1d sorts ``x`` stably and
    evaluates the degree-1 B-spline with knots ``[x0, x0, x1, ..., x_last, x_last]``: on the
    segment ``x[j-1] <= at < x[j]`` (``j`` the first index >= 1 with ``at < x[j]``, else the last
    index), ``w = 1 / (x[j] - x[j-1])`` and the value is ``y[j-1] * (w * (x[j] - at)) +
    y[j] * (w * (at - x[j-1]))``, in de Boor's operation order; a segment of zero length
    (``at`` equal to a repeated last ``x``) gives 0. ``x`` may repeat values (a FAR table does).
    This is interp1d up to scipy 1.8: from 1.9 on it refuses repeated ``x``, which every FAR
    table has, so insightface's script fails there and its numbers are those of scipy <= 1.8.
    Written here because kdface does not depend on scipy. Raises ValueError outside
    ``[min x, max x]`` as interp1d does.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape or xs.size < 2:
        raise ValueError(f"x and y must be 1-D of one length >= 2, got {xs.shape}, {ys.shape}")
    order = np.argsort(xs, kind="mergesort")
    xs, ys = xs[order], ys[order]
    at = float(at)
    if not xs[0] <= at <= xs[-1]:
        raise ValueError(f"{at} lies outside the interpolation range [{xs[0]}, {xs[-1]}]")
    later = np.nonzero(xs[1:] > at)[0]
    j = int(later[0]) + 1 if later.size else xs.size - 1
    xa, xb = xs[j - 1], xs[j]
    if xa == xb:
        return 0.0
    w = 1.0 / (xb - xa)
    return float(ys[j - 1] * (w * (xb - at)) + ys[j] * (w * (at - xa)))


def squared_distances(emb1: Any, emb2: Any) -> np.ndarray:
    """insightface's pair score: ``|n(e1) - n(e2)|^2`` of the normalized embeddings, ``[P]``
    float64 (:func:`l2_normalize`, then ``sum(square(subtract))`` in that order)."""
    a = _float_matrix("emb1", emb1)
    b = _float_matrix("emb2", emb2)
    if a.shape != b.shape:
        raise ValueError(f"emb1 and emb2 must have the same shape [P, D], "
                         f"got {a.shape} and {b.shape}")
    return np.sum(np.square(np.subtract(l2_normalize(a), l2_normalize(b))), 1)


def insightface_verification(emb1: Any, emb2: Any, issame: Any, *, folds: int = 10,
                             far_targets: Sequence[float] = DEFAULT_FAR_TARGETS
                             ) -> dict[str, Any]:
    """insightface's verification protocol, number for number.

    emb1, emb2: [P, D] (normalized here as insightface's ``test`` does before ``evaluate``; with
    the flip option pass the *sum* of the image and mirrored-image embeddings, unnormalized, as
    insightface sums them); issame: [P] bool. Pair distance ``d = |n(e1) - n(e2)|^2``, "same"
    when ``d < t``. Folds: sklearn ``KFold(folds, shuffle=False)``.

    * ``calculate_roc``: per fold, the first (smallest) ``t`` of ``np.arange(0, 4, 0.01)``
      maximizing training accuracy is applied to the test fold.
    * ``calculate_val`` for each FAR target ``f``: the training FAR of every ``t`` of
      ``np.arange(0, 4, 0.001)`` is tabulated; when its maximum reaches ``f`` the threshold is
      :func:`slinear_interpolate` of that table at ``f``, else ``0.0`` (nothing accepted); TAR and
      FAR of the test fold at that threshold are averaged over folds (std of the TARs: numpy's
      population std). insightface reports ``f = 1e-3``.

    Returns :func:`verification`'s keys with thresholds as squared distances (``score`` is
    ``'squared_l2'``) and ``protocol='insightface'``; every FAR has a TAR (the interpolation
    always yields a threshold), so ``tar_at_far_unsupported`` is empty. ``auc``/``roc`` are the
    exact ones (insightface's script reports none). A test fold without positives (or a training
    split without negatives) makes insightface divide by zero; here that fold's TAR (FAR) is NaN
    and left out of the mean.
    """
    dist = squared_distances(emb1, emb2)
    same = _check_issame(issame, dist.shape[0])
    bounds = fold_bounds(dist.shape[0], folds)
    far_targets = _check_far_targets(far_targets)
    grid, val_grid = INSIGHTFACE_ACCURACY_GRID, INSIGHTFACE_VAL_GRID
    fold_acc, fold_thr = [], []
    tars = {f: [] for f in far_targets}
    fars = {f: [] for f in far_targets}
    for start, stop in bounds:
        test = np.zeros(dist.shape[0], bool)
        test[start:stop] = True
        d_tr, y_tr, d_te, y_te = dist[~test], same[~test], dist[test], same[test]
        acc_train = _distance_accuracies(d_tr, y_tr, grid)
        t = grid[int(np.argmax(acc_train))]  # argmax: the first maximum, as insightface's
        fold_thr.append(float(t))
        fold_acc.append(float(_distance_accuracies(d_te, y_te, np.asarray([t]))[0]))
        neg_tr = np.sort(d_tr[~y_tr])
        far_train = (np.searchsorted(neg_tr, val_grid, side="left") / neg_tr.size
                     if neg_tr.size else np.full(val_grid.size, np.nan))
        for f in far_targets:
            if neg_tr.size and np.max(far_train) >= f:
                t_far = slinear_interpolate(far_train, val_grid, f)
            else:
                t_far = 0.0
            n_pos, n_neg = int(y_te.sum()), int((~y_te).sum())
            tars[f].append(np.sum(d_te[y_te] < t_far) / n_pos if n_pos else np.nan)
            fars[f].append(np.sum(d_te[~y_te] < t_far) / n_neg if n_neg else np.nan)
    tar_at_far, tar_std, far_achieved = {}, {}, {}
    for f in far_targets:
        tar_at_far[f], tar_std[f] = _mean_std(tars[f])
        far_achieved[f], _ = _mean_std(fars[f])
    all_acc = _distance_accuracies(dist, same, grid)
    best = int(np.argmax(all_acc))
    cosine = 1.0 - dist / 2.0  # the exact ROC/AUC on the equivalent similarity
    return _protocol_result(fold_acc, fold_thr, float(all_acc[best]), float(grid[best]), cosine,
                            same, tar_at_far, tar_std, far_achieved, [], score="squared_l2",
                            protocol="insightface")


def _protocol_result(fold_acc: list[float], fold_thr: list[float], best_acc: float,
                     best_t: float, similarity: np.ndarray, same: np.ndarray,
                     tar_at_far: dict, tar_std: dict, far_achieved: dict,
                     unsupported: list[float], *, score: str, protocol: str) -> dict[str, Any]:
    """The result dict both protocols return (keys documented on :func:`verification`);
    ``similarity`` (higher = same) gives the ROC and AUC."""
    return {
        "accuracy": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "fold_accuracies": np.asarray(fold_acc),
        "threshold": float(np.mean(fold_thr)),
        "fold_thresholds": np.asarray(fold_thr),
        "best_threshold_accuracy": best_acc,
        "best_threshold": best_t,
        "auc": auc(similarity, same),
        "roc": roc_curve(similarity, same),
        "tar_at_far": tar_at_far,
        "tar_at_far_std": tar_std,
        "far_achieved": far_achieved,
        "tar_at_far_unsupported": unsupported,
        "num_pairs": int(similarity.shape[0]),
        "num_positive": int(same.sum()),
        "num_negative": int((~same).sum()),
        "score": score,
        "protocol": protocol,
    }


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """``np.mean`` / ``np.std`` (insightface's reductions, same floats) over the folds, NaN folds
    left out; ``(None, None)`` when every fold is NaN."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return None, None
    return float(np.mean(arr)), float(np.std(arr))


def _distance_accuracies(dist: np.ndarray, issame: np.ndarray,
                         thresholds: np.ndarray) -> np.ndarray:
    """insightface ``calculate_accuracy`` for each threshold: ``(tp + tn) / n`` of the rule
    ``d < t``, counted exactly by sorting (integer counts, one division, as its float()s)."""
    pos = np.sort(dist[issame])
    neg = np.sort(dist[~issame])
    true_accept = np.searchsorted(pos, thresholds, side="left")
    true_reject = neg.size - np.searchsorted(neg, thresholds, side="left")
    return (true_accept + true_reject) / dist.size


def _accuracy_at(scores: np.ndarray, issame: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Accuracy of ``score > t`` for every t in ``candidates`` by sorted counting (exact)."""
    pos = np.sort(scores[issame])
    neg = np.sort(scores[~issame])
    true_accept = pos.size - np.searchsorted(pos, candidates, side="right")
    true_reject = np.searchsorted(neg, candidates, side="right")
    return (true_accept + true_reject) / max(scores.size, 1)


def _float_matrix(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D] (rank 2), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _check_issame(issame: Any, num_pairs: int) -> np.ndarray:
    arr = np.asarray(issame)
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.integer) or not np.isin(arr, (0, 1)).all():
            raise TypeError(f"issame must be bool (or 0/1 integers), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    if arr.ndim != 1 or arr.shape[0] != num_pairs:
        raise ValueError(f"issame must have shape [P]=[{num_pairs}] (one flag per pair), "
                         f"got shape {arr.shape}")
    return arr


def _check_folds(folds: Any, num_pairs: int) -> None:
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)):
        raise TypeError(f"folds must be an int, got {type(folds).__name__}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2 (threshold on k-1 folds, test on one), got {folds}")
    if folds > num_pairs:
        raise ValueError(f"folds={folds} exceeds the number of pairs P={num_pairs}")


def _check_far_targets(far_targets: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(f) for f in far_targets)
    for f in out:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"far_targets must lie in (0, 1], got {f}")
    return out


def _check_thresholds(thresholds: Any) -> np.ndarray:
    arr = np.asarray(thresholds, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"thresholds must be a non-empty finite 1-D array of cosine thresholds, "
                         f"got shape {arr.shape}")
    return np.unique(arr)
