"""Tests for kdface.metrics verification: hand-computed folds, literal loops, fold order, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kdface import metrics

from _tolerance import EPS32, assert_close

F64 = np.float64
# The scores of _pairs_with_scores carry float64 rounding: sqrt(1 - s^2) (3 steps), the
# normalization (2-term sum of squares, sqrt, divide: 4), the 2-term dot product (2), and a
# midpoint threshold one more (1): 10 rounding steps on values of magnitude <= 1.
SCORE_STEPS = 10


def _pairs_with_scores(scores):
    """2-D embeddings whose pair cosine is exactly-ish the given score."""
    s = np.asarray(scores, dtype=np.float64)
    emb1 = np.tile([1.0, 0.0], (s.size, 1))
    emb2 = np.stack([s, np.sqrt(1.0 - s * s)], axis=1)
    return emb1, emb2


# Hand case 1 (P=6, 3 folds of 2 pairs): scores and labels in file order.
HAND_SCORES = [0.9, 0.2, 0.6, 0.7, 0.5, 0.1]
HAND_SAME = [True, False, True, False, True, False]


def test_hand_computed_three_folds():
    # fold 0: train {.6T .7F .5T .1F} -> best t=0.3 (3/4); test {.9T .2F} -> 1.0
    # fold 1: train {.9T .2F .5T .1F} separable -> t=0.35; test {.6T .7F} -> 0.5
    # fold 2: train {.9T .2F .6T .7F}: t=0.4 and t=0.8 both 3/4, ties -> 0.8;
    #         test {.5T .1F} -> 0.5 (t=0.4 would give 1.0, so the tie rule is exercised)
    e1, e2 = _pairs_with_scores(HAND_SCORES)
    r = metrics.verification(e1, e2, np.array(HAND_SAME), folds=3, far_targets=(0.5,))
    # counts over 2 test pairs and their mean: k/2 and (1 + .5 + .5)/3 are single roundings of
    # exact values, the same floats as the literals (exact)
    np.testing.assert_array_equal(r["fold_accuracies"], [1.0, 0.5, 0.5])
    assert r["accuracy"] == 2 / 3
    # np.std: 3 squared deviations of accuracies <= 1 summed (terms 3, scale 1), float64
    assert_close(r["accuracy_std"], math.sqrt(1 / 18), terms=3, scale=1.0, dtype=F64)
    # midpoints of float64 scores (SCORE_STEPS roundings of magnitude-1 values), then the
    # 3-term mean of the fold thresholds
    assert_close(r["fold_thresholds"], [0.3, 0.35, 0.8], terms=SCORE_STEPS, scale=1.0, dtype=F64)
    assert_close(r["threshold"], 1.45 / 3, terms=SCORE_STEPS + 3, scale=1.0, dtype=F64)
    # all pairs: t=0.35 accepts .5T .6T .7F .9T -> 5/6
    assert r["best_threshold_accuracy"] == 5 / 6  # a count / 6: exact
    assert_close(r["best_threshold"], 0.35, terms=SCORE_STEPS, scale=1.0, dtype=F64)
    # positives {.9,.6,.5} vs negatives {.2,.7,.1}: 7 of 9 ordered correctly
    # trapezoids over the <= 7 ROC points (rates k/3), float64: terms 7, scale 1
    assert_close(r["auc"], 7 / 9, terms=7, scale=1.0, dtype=F64)
    assert (r["num_pairs"], r["num_positive"], r["num_negative"]) == (6, 3, 3)


def test_hand_computed_tar_at_far():
    # 2 folds of 6 pairs; each training set has 4 negatives, so FAR >= 0.25 is supported.
    scores = [0.8, 0.3, 0.6, 0.5, 0.2, 0.1, 0.9, 0.55, 0.7, 0.4, 0.35, 0.0]
    same = [1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    e1, e2 = _pairs_with_scores(scores)
    r = metrics.verification(e1, e2, np.array(same), folds=2, far_targets=(0.75, 0.25, 0.2))
    # FAR .25 -> k=1: test A uses t=0.4 (2nd of B's negs .7 .4 .35 .0): TAR 1/2, FAR 2/4;
    #                 test B uses t=0.5 (2nd of A's negs .6 .5 .2 .1): TAR 2/2, FAR 1/4.
    # means and std of the fold rates 1/2, 2/2 and 2/4, 1/4: dyadic, every step exact
    assert r["tar_at_far"][0.25] == 0.75
    assert r["far_achieved"][0.25] == 0.375
    assert r["tar_at_far_std"][0.25] == 0.25
    # FAR .75 -> k=3: thresholds 0.0 and 0.1, every test positive accepted.
    assert r["tar_at_far"][0.75] == 1.0
    # FAR .2 admits floor(0.8)=0 of 4 training negatives: unsupported.
    assert r["tar_at_far"][0.2] is None
    assert r["tar_at_far_unsupported"] == [0.2]


def test_default_far_targets_report_unsupported_on_small_sets():
    rng = np.random.default_rng(0)
    e1, e2 = rng.normal(size=(2, 600, 8))
    same = np.arange(600) % 2 == 0
    r = metrics.verification(e1, e2, same)
    # 300 negatives, 270 per training split: 1e-1 and 1e-2 supported; 1e-3 .. 1e-6 not.
    assert r["tar_at_far_unsupported"] == [1e-3, 1e-4, 1e-5, 1e-6]
    assert r["tar_at_far"][1e-2] is not None and r["tar_at_far"][1e-6] is None


def test_fold_boundaries_follow_file_order():
    # [.9T .1F | .8T .2F]: each training fold separates -> accuracy 1.
    e1, e2 = _pairs_with_scores([0.9, 0.1, 0.8, 0.2])
    r = metrics.verification(e1, e2, np.array([1, 0, 1, 0]), folds=2, far_targets=())
    assert r["accuracy"] == 1.0
    # Same pairs reordered [.9T .8T | .1F .2F]: each training fold holds one class only, so
    # the chosen threshold misclassifies the whole test fold -> accuracy 0.
    e1, e2 = _pairs_with_scores([0.9, 0.8, 0.1, 0.2])
    r = metrics.verification(e1, e2, np.array([1, 1, 0, 0]), folds=2, far_targets=())
    assert r["accuracy"] == 0.0
    # max + 1 and min - 1 of float64 scores: SCORE_STEPS + 1 roundings, magnitude <= 1.2
    assert_close(r["fold_thresholds"], [1.2, -0.2], terms=SCORE_STEPS + 1, scale=1.2, dtype=F64)


def test_fold_bounds_match_kfold_sizes():
    assert metrics.fold_bounds(23, 10) == [(0, 3), (3, 6), (6, 9), (9, 11), (11, 13),
                                           (13, 15), (15, 17), (17, 19), (19, 21), (21, 23)]
    parts = np.array_split(np.arange(6000), 10)
    assert metrics.fold_bounds(6000, 10) == [(p[0], p[-1] + 1) for p in parts]


def _literal_reference(scores, same, folds, far_targets):
    """Plain loops: folds by np.array_split, every midpoint tried, ties -> largest threshold."""
    idx_folds = np.array_split(np.arange(len(scores)), folds)
    accs, tars = [], {f: [] for f in far_targets}
    for test_idx in idx_folds:
        train_idx = [i for i in range(len(scores)) if i not in set(test_idx.tolist())]
        train_scores = sorted(set(float(scores[i]) for i in train_idx))
        cands = [train_scores[0] - 1.0]
        cands += [(a + b) / 2 for a, b in zip(train_scores[:-1], train_scores[1:])]
        cands += [train_scores[-1] + 1.0]
        best_t, best_acc = None, -1.0
        for t in cands:
            acc = sum((scores[i] > t) == same[i] for i in train_idx) / len(train_idx)
            if acc >= best_acc:
                best_t, best_acc = t, acc
        accs.append(sum((scores[i] > best_t) == same[i] for i in test_idx) / len(test_idx))
        negs = sorted((float(scores[i]) for i in train_idx if not same[i]), reverse=True)
        for f in far_targets:
            k = int(math.floor(f * len(negs) + 1e-9))
            t = negs[k] if k < len(negs) else negs[-1] - 1.0
            pos = [i for i in test_idx if same[i]]
            tars[f].append(sum(scores[i] > t for i in pos) / len(pos))
    return np.mean(accs), np.std(accs), {f: np.mean(v) for f, v in tars.items()}


@pytest.mark.parametrize("num_pairs,folds", [(60, 10), (47, 10), (31, 4)])
def test_matches_literal_loop_reference(num_pairs, folds):
    rng = np.random.default_rng(num_pairs)
    same = rng.random(num_pairs) < 0.5
    same[[p[0] for p in np.array_split(np.arange(num_pairs), folds)]] = True  # test positives
    e1 = rng.normal(size=(num_pairs, 16)).astype(np.float32)
    e2 = (np.where(same[:, None], 0.8, 0.0) * e1
          + rng.normal(size=(num_pairs, 16))).astype(np.float32)
    r = metrics.verification(e1, e2, same, folds=folds, far_targets=(0.5, 0.2, 0.1))
    scores = metrics.pair_scores(e1, e2)
    ref_acc, ref_std, ref_tar = _literal_reference(scores, same, folds, (0.5, 0.2, 0.1))
    # Exact: the same scores, the same integer counts per fold, then the same NumPy float64
    # reductions (count / n, np.mean, np.std over the folds) on both sides.
    assert r["accuracy"] == ref_acc
    assert r["accuracy_std"] == ref_std
    for f in (0.5, 0.2, 0.1):
        assert r["tar_at_far"][f] == ref_tar[f]


def test_distance_grid_reproduces_insightface_rule():
    # insightface: predict same when |e1-e2|^2 < t_d over np.arange(0, 4, 0.01), first argmax.
    rng = np.random.default_rng(3)
    same = np.arange(200) % 2 == 0
    e1 = rng.normal(size=(200, 8))
    e2 = np.where(same[:, None], 1.0, 0.0) * e1 + rng.normal(size=(200, 8))
    n1, n2 = metrics.l2_normalize(e1), metrics.l2_normalize(e2)
    dist = np.sum((n1 - n2) ** 2, axis=1)
    grid_d = np.arange(0, 4, 0.01)
    accs = []
    for test_idx in np.array_split(np.arange(200), 10):
        train = np.setdiff1d(np.arange(200), test_idx)
        train_acc = [np.mean((dist[train] < t) == same[train]) for t in grid_d]
        t = grid_d[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test_idx] < t) == same[test_idx]))
    r = metrics.verification(e1, e2, same, thresholds=1.0 - grid_d / 2.0, far_targets=())
    # Exact (the same counts): no distance lies within float64 rounding (a few eps x 4) of a
    # grid point, so d < t and cos > 1 - t/2 split the pairs alike; checked, not assumed.
    assert np.min(np.abs(dist[:, None] - grid_d[None, :])) > 1e3 * np.finfo(F64).eps
    assert r["accuracy"] == np.mean(accs)


def test_accuracy_independent_of_embedding_scale_and_dtype():
    rng = np.random.default_rng(1)
    e1, e2 = rng.normal(size=(2, 40, 6))
    same = rng.random(40) < 0.5
    a = metrics.verification(e1, e2, same, folds=4)
    b = metrics.verification(3.0 * e1.astype(np.float32), 0.5 * e2.astype(np.float32), same,
                             folds=4)
    # Exact: the float32 copies (cast, x3: 2 roundings per component, normalized in float64)
    # move each cosine by at most eps32 x 6 components x 3; two scores cannot swap unless their
    # gap is under twice that, and the smallest gap here is far larger (checked, not assumed).
    s = np.sort(metrics.pair_scores(e1, e2))
    assert np.min(np.diff(s)) > 2 * EPS32 * 3 * 6
    assert a["accuracy"] == b["accuracy"]


def test_auc_perfect_and_reversed():
    same = np.array([1, 1, 1, 0, 0, 0], bool)
    assert metrics.auc(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), same) == 1.0
    assert metrics.auc(np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), same) == 0.0
    assert metrics.auc(np.array([0.5] * 6), same) == 0.5  # one trapezoid (0,0)-(1,1): exact
    roc = metrics.roc_curve(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), same)
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0 and roc["fpr"][-1] == 1.0


def test_auc_equals_pair_counting():
    rng = np.random.default_rng(5)
    s = np.round(rng.normal(size=50), 1)          # rounding creates ties
    y = rng.random(50) < 0.4
    pos, neg = s[y], s[~y]
    ref = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    # float64: trapezoids over <= 51 ROC points vs a mean of 0 / .5 / 1 over the pos x neg pairs
    # (both sides carry rounding): terms 2 x pairs, scale 1
    assert_close(metrics.auc(s, y), ref, terms=2 * pos.size * neg.size, scale=1.0, dtype=F64)


def test_embeddings_with_flip_and_split_interleaved():
    a = np.array([[3.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 3.0], [0.0, 2.0]])
    # float64 normalize of a 2-d sum: the add, a 2-term sum of squares, sqrt, divide (terms 5)
    assert_close(metrics.embeddings_with_flip(a, b),
                 [[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 1.0]], terms=5, scale=1.0, dtype=F64)
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    e1, e2 = metrics.split_interleaved(x)
    np.testing.assert_array_equal(e1, x[[0, 2, 4]])
    np.testing.assert_array_equal(e2, x[[1, 3, 5]])


def test_bad_inputs_raise_clear_errors():
    e = np.ones((5, 4), np.float32)
    same = np.array([1, 0, 1, 0, 1], bool)
    with pytest.raises(ValueError, match="even number of rows"):
        metrics.split_interleaved(np.ones((7, 4), np.float32))
    with pytest.raises(ValueError, match=r"issame must have shape \[P\]=\[5\]"):
        metrics.verification(e, e, same[:4], folds=2)
    with pytest.raises(ValueError, match="same shape"):
        metrics.verification(e, e[:4], same, folds=2)
    with pytest.raises(ValueError, match="exceeds the number of pairs"):
        metrics.verification(e, e, same, folds=6)
    with pytest.raises(ValueError, match="folds must be >= 2"):
        metrics.verification(e, e, same, folds=1)
    with pytest.raises(TypeError, match="floating"):
        metrics.verification(np.ones((5, 4), np.int32), e, same, folds=2)
    with pytest.raises(TypeError, match="issame must be bool"):
        metrics.verification(e, e, np.array([0.0, 1, 0, 1, 0]), folds=2)
    with pytest.raises(ValueError, match=r"far_targets must lie in \(0, 1\]"):
        metrics.verification(e, e, same, folds=2, far_targets=(0.0,))
    with pytest.raises(ValueError, match="rank 2"):
        metrics.verification(np.ones((5,), np.float32), e, same, folds=2)
    with pytest.raises(ValueError, match="NaN"):
        metrics.verification(np.full((5, 4), np.nan, np.float32), e, same, folds=2)


# --- protocol='insightface': insightface's verification.py, re-implemented here as the reference

def _kfold_test_indices(n, k):
    """sklearn KFold(n_splits=k, shuffle=False) test folds (sklearn's own when installed)."""
    try:
        from sklearn.model_selection import KFold
    except ImportError:  # its documented rule: the first n % k folds hold n // k + 1 samples
        sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
        starts = np.cumsum([0] + sizes[:-1])
        return [np.arange(s, s + z) for s, z in zip(starts, sizes)]
    return [test for _, test in KFold(n_splits=k, shuffle=False).split(np.arange(n))]


def _sk_normalize(x):
    """sklearn.preprocessing.normalize (its rule written out when sklearn is absent)."""
    try:
        from sklearn.preprocessing import normalize
    except ImportError:
        x = np.array(x, dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
        x /= norms[:, np.newaxis]
        return x
    return normalize(np.asarray(x, dtype=np.float64))


def _interp1d_slinear(x, y):
    """scipy ``interp1d(x, y, kind='slinear')`` as insightface ran it. From scipy 1.9 on
    interp1d refuses repeated x values, which every FAR table has, and insightface's
    calculate_val fails (its users pin scipy 1.8.1); up to 1.8 interp1d sorted x stably and
    built the degree-1 B-spline with knots [x0, x, x_last] and coefficients y, which is what is
    built here, with scipy's own BSpline, when the installed interp1d refuses."""
    from scipy import interpolate
    try:
        return interpolate.interp1d(x, y, kind="slinear")
    except ValueError as err:
        if "duplicates" not in str(err):
            raise
    order = np.argsort(x, kind="mergesort")
    xs, ys = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    spline = interpolate.BSpline.construct_fast(np.r_[xs[0], xs, xs[-1]], ys, 1)

    def f(at):
        if not xs[0] <= at <= xs[-1]:
            raise ValueError("A value in x_new is outside the interpolation range.")
        return spline(at)
    return f


def _if_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    return float(tp + tn) / dist.size


def _if_val_far(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    true_accept = np.sum(np.logical_and(predict_issame, actual_issame))
    false_accept = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    return (float(true_accept) / float(np.sum(actual_issame)),
            float(false_accept) / float(np.sum(np.logical_not(actual_issame))))


def _insightface_evaluate(emb_a, emb_b, actual_issame, nrof_folds, far_targets):
    """insightface arcface_torch/eval/verification.py: test() normalizes the embeddings,
    evaluate() runs calculate_roc (grid 0.01) and calculate_val (grid 0.001, interp1d
    'slinear' from scipy) with KFold folds; plain loops over thresholds and folds."""
    e1, e2 = _sk_normalize(emb_a), _sk_normalize(emb_b)
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    folds = _kfold_test_indices(len(actual_issame), nrof_folds)
    thresholds = np.arange(0, 4, 0.01)
    accuracy = np.zeros(nrof_folds)
    for fold_idx, test_set in enumerate(folds):
        train_set = np.setdiff1d(np.arange(len(actual_issame)), test_set)
        acc_train = np.zeros(len(thresholds))
        for i, threshold in enumerate(thresholds):
            acc_train[i] = _if_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best = np.argmax(acc_train)
        accuracy[fold_idx] = _if_accuracy(thresholds[best], dist[test_set],
                                          actual_issame[test_set])
    thresholds = np.arange(0, 4, 0.001)
    vals = {}
    for far_target in far_targets:
        val, far = np.zeros(nrof_folds), np.zeros(nrof_folds)
        for fold_idx, test_set in enumerate(folds):
            train_set = np.setdiff1d(np.arange(len(actual_issame)), test_set)
            far_train = np.zeros(len(thresholds))
            for i, threshold in enumerate(thresholds):
                _, far_train[i] = _if_val_far(threshold, dist[train_set],
                                              actual_issame[train_set])
            if np.max(far_train) >= far_target:
                f = _interp1d_slinear(far_train, thresholds)
                threshold = f(far_target)
            else:
                threshold = 0.0
            val[fold_idx], far[fold_idx] = _if_val_far(threshold, dist[test_set],
                                                       actual_issame[test_set])
        vals[far_target] = (np.mean(val), np.std(val), np.mean(far))
    return np.mean(accuracy), np.std(accuracy), accuracy, vals


def _hard_set(num_pairs, seed):
    """Pairs whose squared distances sit on, or an ulp or two beside, the 0.01 grid points
    (cosine 1 - g/2), with tied negatives (repeated pairs) and each fold holding both labels."""
    rng = np.random.default_rng(seed)
    grid_points = rng.integers(40, 160, num_pairs) / 100.0
    cos = 1.0 - grid_points / 2.0 + rng.choice([0.0, 1e-16, -1e-16, 2e-16], num_pairs)
    same = grid_points + rng.normal(0, 0.25, num_pairs) < 1.0
    for test in _kfold_test_indices(num_pairs, 10):
        same[test[0]], same[test[-1]] = True, False
    cos[~same] = np.where(rng.random(int((~same).sum())) < 0.4, 0.45, cos[~same])  # ties
    sin = np.sqrt(1.0 - cos * cos)
    scale = rng.uniform(0.5, 3.0, (num_pairs, 1))  # not normalized: normalization is part
    e1 = np.tile([1.0, 0.0, 0.0], (num_pairs, 1)) * scale
    e2 = np.stack([cos, sin, np.zeros(num_pairs)], 1) * scale[::-1]
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    return e1 @ rot, e2 @ rot, same


@pytest.mark.parametrize("num_pairs,seed", [(60, 0), (47, 1), (93, 2)])
def test_insightface_protocol_equals_insightface_numbers(num_pairs, seed):
    """Odd pair counts (KFold's first n % 10 folds one pair longer), distances on grid
    boundaries and tied negatives: every number equals insightface's, bit for bit."""
    e1, e2, same = _hard_set(num_pairs, seed)
    fars = (1e-3, 0.1, 0.3)
    r = metrics.verification(e1, e2, same, far_targets=fars, protocol="insightface")
    acc, std, fold_acc, vals = _insightface_evaluate(e1, e2, same, 10, fars)
    np.testing.assert_array_equal(r["fold_accuracies"], fold_acc)
    assert r["accuracy"] == acc and r["accuracy_std"] == std
    for f in fars:
        assert (r["tar_at_far"][f], r["tar_at_far_std"][f], r["far_achieved"][f]) == vals[f], f
    assert r["protocol"] == "insightface" and r["score"] == "squared_l2"
    assert r["tar_at_far_unsupported"] == []


def test_insightface_protocol_flip_sum_and_pipeline_equal_reference():
    """With flip insightface sums the two embeddings and normalizes the sum once; passing the
    raw sums reproduces it (float32 network outputs, as a backbone gives)."""
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(2, 2 * 71, 12)).astype(np.float32)
    same = rng.random(71) < 0.5
    emb[1, 1::2][same] += 1.5 * emb[0, 0::2][same]
    raw = emb[0].astype(np.float64) + emb[1].astype(np.float64)
    a, b = metrics.split_interleaved(raw)
    r = metrics.verification(a, b, same, far_targets=(1e-3,), protocol="insightface")
    acc, std, _, vals = _insightface_evaluate(raw[0::2], raw[1::2], same, 10, (1e-3,))
    assert (r["accuracy"], r["accuracy_std"]) == (acc, std)
    assert (r["tar_at_far"][1e-3], r["tar_at_far_std"][1e-3], r["far_achieved"][1e-3]) == \
        vals[1e-3]
    # embeddings_with_flip is sklearn's normalize of the sum, the same floats
    np.testing.assert_array_equal(metrics.embeddings_with_flip(emb[0], emb[1]),
                                  _sk_normalize(raw))


def test_insightface_grid_cannot_split_what_exact_protocol_splits():
    """A positive at d=0.503 and a negative at d=0.507 share one 0.01 grid cell: insightface's
    grid cannot separate them, the exact candidates can. Both protocols stay selectable."""
    d = np.array([0.2, 0.503, 0.507, 1.5] * 5)
    same = np.array([True, True, False, False] * 5)
    e1, e2 = _pairs_with_scores(1.0 - d / 2.0)
    exact = metrics.verification(e1, e2, same, folds=5, far_targets=())
    grid = metrics.verification(e1, e2, same, folds=5, far_targets=(), protocol="insightface")
    assert exact["accuracy"] == 1.0 and exact["protocol"] == "exact"
    assert grid["accuracy"] == 0.75  # 3/4 in every fold (exact); 0.51 also accepts the 0.507
    with pytest.raises(ValueError, match="protocol must be one of"):
        metrics.verification(e1, e2, same, protocol="lfw")
    with pytest.raises(ValueError, match="custom thresholds"):
        metrics.verification(e1, e2, same, thresholds=[0.5], protocol="insightface")


def test_slinear_interpolate_equals_scipy_interp1d():
    """Including repeated x (a FAR table is flat where no negative changes side), `at` equal to
    a repeated value, the ends, and a repeated last value (scipy gives 0 there)."""
    pytest.importorskip("scipy.interpolate", reason="scipy comes with jax")
    rng = np.random.default_rng(0)
    for trial in range(30):
        x = np.sort(rng.integers(0, 8, 12) / 8.0)
        x[0] = 0.0
        y = np.arange(12) * 0.001 + rng.normal(0, 1e-4, 12)
        f = _interp1d_slinear(x, y)
        for at in [*np.unique(x), *(rng.uniform(0, x[-1], 4))]:
            want = f(at)
            got = metrics.slinear_interpolate(x, y, at)
            assert not np.isnan(want)
            assert got == float(want) or (np.isnan(want) and np.isnan(got)), (trial, at)
    with pytest.raises(ValueError, match="outside the interpolation range"):
        metrics.slinear_interpolate([0.0, 0.5], [1.0, 2.0], 0.6)
