"""Tests for kdface.metrics verification: hand-computed folds, literal loops, fold order, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kdface import metrics


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
    np.testing.assert_allclose(r["fold_accuracies"], [1.0, 0.5, 0.5])
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["accuracy_std"] == pytest.approx(math.sqrt(1 / 18))
    np.testing.assert_allclose(r["fold_thresholds"], [0.3, 0.35, 0.8], atol=1e-12)
    assert r["threshold"] == pytest.approx(1.45 / 3)
    # all pairs: t=0.35 accepts .5T .6T .7F .9T -> 5/6
    assert r["best_threshold_accuracy"] == pytest.approx(5 / 6)
    assert r["best_threshold"] == pytest.approx(0.35)
    # positives {.9,.6,.5} vs negatives {.2,.7,.1}: 7 of 9 ordered correctly
    assert r["auc"] == pytest.approx(7 / 9)
    assert (r["num_pairs"], r["num_positive"], r["num_negative"]) == (6, 3, 3)


def test_hand_computed_tar_at_far():
    # 2 folds of 6 pairs; each training set has 4 negatives, so FAR >= 0.25 is supported.
    scores = [0.8, 0.3, 0.6, 0.5, 0.2, 0.1, 0.9, 0.55, 0.7, 0.4, 0.35, 0.0]
    same = [1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    e1, e2 = _pairs_with_scores(scores)
    r = metrics.verification(e1, e2, np.array(same), folds=2, far_targets=(0.75, 0.25, 0.2))
    # FAR .25 -> k=1: test A uses t=0.4 (2nd of B's negs .7 .4 .35 .0): TAR 1/2, FAR 2/4;
    #                 test B uses t=0.5 (2nd of A's negs .6 .5 .2 .1): TAR 2/2, FAR 1/4.
    assert r["tar_at_far"][0.25] == pytest.approx(0.75)
    assert r["far_achieved"][0.25] == pytest.approx(0.375)
    assert r["tar_at_far_std"][0.25] == pytest.approx(0.25)
    # FAR .75 -> k=3: thresholds 0.0 and 0.1, every test positive accepted.
    assert r["tar_at_far"][0.75] == pytest.approx(1.0)
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
    np.testing.assert_allclose(r["fold_thresholds"], [1.2, -0.2])


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
    assert r["accuracy"] == pytest.approx(ref_acc, rel=1e-12)
    assert r["accuracy_std"] == pytest.approx(ref_std, rel=1e-9, abs=1e-12)
    for f in (0.5, 0.2, 0.1):
        assert r["tar_at_far"][f] == pytest.approx(ref_tar[f], rel=1e-12)


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
    assert r["accuracy"] == pytest.approx(np.mean(accs))


def test_accuracy_independent_of_embedding_scale_and_dtype():
    rng = np.random.default_rng(1)
    e1, e2 = rng.normal(size=(2, 40, 6))
    same = rng.random(40) < 0.5
    a = metrics.verification(e1, e2, same, folds=4)
    b = metrics.verification(3.0 * e1.astype(np.float32), 0.5 * e2.astype(np.float32), same,
                             folds=4)
    assert a["accuracy"] == pytest.approx(b["accuracy"])


def test_auc_perfect_and_reversed():
    same = np.array([1, 1, 1, 0, 0, 0], bool)
    assert metrics.auc(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), same) == 1.0
    assert metrics.auc(np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), same) == 0.0
    assert metrics.auc(np.array([0.5] * 6), same) == pytest.approx(0.5)
    roc = metrics.roc_curve(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), same)
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0 and roc["fpr"][-1] == 1.0


def test_auc_equals_pair_counting():
    rng = np.random.default_rng(5)
    s = np.round(rng.normal(size=50), 1)          # rounding creates ties
    y = rng.random(50) < 0.4
    pos, neg = s[y], s[~y]
    ref = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert metrics.auc(s, y) == pytest.approx(ref)


def test_embeddings_with_flip_and_split_interleaved():
    a = np.array([[3.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 3.0], [0.0, 2.0]])
    np.testing.assert_allclose(metrics.embeddings_with_flip(a, b),
                               [[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 1.0]])
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
