"""Tests for kdface.metrics identification: brute force references, chunking, ties, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kdface import metrics

from _tolerance import bound, assert_close

NO_LABEL = -1  # distractors in the brute-force references


def _score_bound(d):
    """How far kdface's float32 cosine (unit_rows32: a d-term sum of squares, sqrt, divide, for
    each row; then a d-term dot product of unit rows) may sit from the float64 one: the rule's
    bound with terms 3d + 4, scale 1 (unit vectors)."""
    return bound(terms=3 * d + 4, scale=1.0)


def _assert_separated(a, b, d, what):
    """The counts compared below are exact only if every score comparison that decides them has
    the same outcome in float32 as in float64: each decisive gap |a - b| (float64) must exceed
    twice the score bound (both scores move). Checked on the data, not assumed."""
    gap = np.min(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
    assert gap > 2 * _score_bound(d), f"{what}: a decisive gap of {gap:.3g} is within rounding"


def _mate_gaps(sim, is_mate):
    """Per mated row, the best mate's score minus every non-mate's score (the rank comparisons)."""
    best = np.where(is_mate, sim, -np.inf).max(axis=1, keepdims=True)
    rows = is_mate.any(axis=1)
    return (best - np.where(is_mate, np.nan, sim))[rows]


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _at_angles(degrees):
    r = np.radians(np.asarray(degrees, np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


def _random_search(seed, q=37, g=23, m=150, d=8, ids=10):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ids, d))
    g_lab = rng.integers(0, ids, g)
    p_lab = rng.integers(0, ids + 3, q)          # some probes have no mate (labels >= ids)
    gallery = centers[g_lab] + 0.9 * rng.normal(size=(g, d))
    probe = np.where((p_lab < ids)[:, None], centers[np.minimum(p_lab, ids - 1)], 0.0)
    probe = probe + 0.9 * rng.normal(size=(q, d))
    distr = rng.normal(size=(m, d))
    return (probe.astype(np.float32), p_lab, gallery.astype(np.float32), g_lab,
            distr.astype(np.float32))


def _brute_rank_accuracy(probe, p_lab, gallery, g_lab, distr, ranks):
    items = np.concatenate([gallery, distr])
    labels = np.concatenate([g_lab, np.full(distr.shape[0], NO_LABEL)])
    sim = _unit(probe) @ _unit(items).T
    order = np.argsort(-sim, axis=1)
    mated = np.isin(p_lab, g_lab)
    gaps = _mate_gaps(sim, p_lab[:, None] == labels[None, :])
    _assert_separated(gaps[~np.isnan(gaps)], 0.0, probe.shape[1], "rank")
    return {k: np.mean([p_lab[i] in labels[order[i, :k]] for i in np.nonzero(mated)[0]])
            for k in ranks}


def test_hand_computed_rank_with_distractor():
    # scores with probe at 0 deg: distractor 5 > id1 10 > id2 20 > mate 30 > id3 50 -> rank 4.
    probe = _at_angles([0.0])
    gallery = _at_angles([30.0, 10.0, 20.0, 50.0])
    r = metrics.identify(probe, np.array([0]), gallery, np.array([0, 1, 2, 3]),
                         distractor_emb=_at_angles([5.0]), ranks=(1, 3, 4, 5), fpr_targets=())
    assert r["rank_accuracy"] == {1: 0.0, 3: 0.0, 4: 1.0, 5: 1.0}
    np.testing.assert_array_equal(r["cmc"], [0, 0, 0, 1, 1])


def test_exact_ties_count_for_the_probe():
    # A non-mate identical to the mate does not push the mate below rank 1.
    probe = _at_angles([0.0])
    gallery = _at_angles([20.0, 20.0, 40.0])
    r = metrics.identify(probe, np.array([7]), gallery, np.array([8, 7, 9]), ranks=(1,),
                         fpr_targets=())
    assert r["rank_accuracy"][1] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_accuracy_equals_brute_force(seed):
    probe, p_lab, gallery, g_lab, distr = _random_search(seed)
    ranks = (1, 2, 5, 10)
    r = metrics.identify(probe, p_lab, gallery, g_lab, distractor_emb=distr, ranks=ranks,
                         probe_chunk=8, item_chunk=16)
    ref = _brute_rank_accuracy(probe, p_lab, gallery, g_lab, distr, ranks)
    for k in ranks:  # the same count / mated probes (separated scores): exact
        assert r["rank_accuracy"][k] == ref[k]
    assert r["num_mated"] == int(np.isin(p_lab, g_lab).sum())
    assert 0 < r["rank_accuracy"][1] < r["rank_accuracy"][10]   # the test can discriminate


def test_chunked_equals_unchunked():
    probe, p_lab, gallery, g_lab, distr = _random_search(2, q=41, g=29, m=97)
    kw = dict(distractor_emb=distr, ranks=(1, 3, 10), fpr_targets=(0.05, 0.01, 1e-3))
    whole = metrics.identify(probe, p_lab, gallery, g_lab, probe_chunk=1000, item_chunk=1000,
                             **kw)
    for pc, ic in [(1, 1), (7, 5), (3, 13), (41, 30), (40, 96)]:
        part = metrics.identify(probe, p_lab, gallery, g_lab, probe_chunk=pc, item_chunk=ic,
                                **kw)
        assert part["rank_accuracy"] == whole["rank_accuracy"]
        assert part["tpr_at_fpr"] == whole["tpr_at_fpr"]
        assert part["dir_at_fpir"] == whole["dir_at_fpir"]


def test_tpr_and_dir_equal_brute_force():
    probe, p_lab, gallery, g_lab, distr = _random_search(3, q=60, g=30, m=200)
    fprs = (0.1, 0.01, 1e-3, 1e-6)
    r = metrics.identify(probe, p_lab, gallery, g_lab, distractor_emb=distr, ranks=(1,),
                         fpr_targets=fprs, probe_chunk=16, item_chunk=32)
    sim_g = _unit(probe) @ _unit(gallery).T
    sim_d = _unit(probe) @ _unit(distr).T
    is_mate = p_lab[:, None] == g_lab[None, :]
    genuine = sim_g[is_mate]
    impostor = np.sort(np.concatenate([sim_g[~is_mate], sim_d.ravel()]))[::-1]
    mated = is_mate.any(axis=1)
    best_mate = np.where(is_mate, sim_g, -np.inf).max(axis=1)
    best_nonmate = np.maximum(np.where(is_mate, -np.inf, sim_g).max(axis=1), sim_d.max(axis=1))
    top1_nonmated = np.sort(best_nonmate[~mated])[::-1]
    d = probe.shape[1]
    _assert_separated(best_mate[mated], best_nonmate[mated], d, "mate vs non-mate")
    # Exact below: the same counts (every decisive comparison separated) over the same n.
    for f in fprs:
        k = math.floor(f * impostor.size + 1e-9)
        if k == 0:
            assert r["tpr_at_fpr"][f] is None and f in r["tpr_at_fpr_unsupported"]
        else:  # the (k+1)-th impostor is the threshold: its neighbours and the genuine apart
            _assert_separated(impostor[k], impostor[[k - 1, k + 1]], d, "threshold order")
            _assert_separated(genuine, impostor[k], d, "genuine vs threshold")
            assert r["tpr_at_fpr"][f] == np.mean(genuine > impostor[k])
        kn = math.floor(f * top1_nonmated.size + 1e-9)
        if kn == 0:
            assert r["dir_at_fpir"][f] is None and f in r["dir_at_fpir_unsupported"]
        else:
            _assert_separated(top1_nonmated[kn], top1_nonmated[[kn - 1, kn + 1]], d, "FPIR")
            _assert_separated(best_mate[mated], top1_nonmated[kn], d, "mate vs threshold")
            hit = (best_mate[mated] >= best_nonmate[mated]) & (best_mate[mated]
                                                               > top1_nonmated[kn])
            assert r["dir_at_fpir"][f] == np.mean(hit)
    assert r["tpr_at_fpr"][0.01] is not None and r["dir_at_fpir"][0.1] is not None


def test_tail_of_scores_keeps_order_statistics_under_compaction():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(3_000_000,)).astype(np.float32)
    tail = metrics.TailOfScores(1000)
    for block in np.array_split(values, 17):
        tail.add(block)
    np.testing.assert_array_equal(tail.largest(), np.sort(values)[::-1][:1000])


def test_megaface_identification_equals_literal_loops():
    rng = np.random.default_rng(5)
    p_lab = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])            # id 2 has one image: no search
    centers = rng.normal(size=(4, 6))
    probe = (centers[p_lab] + 0.8 * rng.normal(size=(10, 6))).astype(np.float32)
    distr = rng.normal(size=(300, 6)).astype(np.float32)
    r = metrics.megaface_identification(probe, p_lab, distr, ranks=(1, 10), fpr_targets=(1e-2,),
                                        probe_chunk=3, item_chunk=7)
    sim_p, sim_d = _unit(probe) @ _unit(probe).T, _unit(probe) @ _unit(distr).T
    correct, searches, genuine = {1: 0, 10: 0}, 0, []
    for p in range(10):
        for g in range(10):
            if p != g and p_lab[p] == p_lab[g]:
                searches += 1
                above = int(np.sum(sim_d[p] > sim_p[p, g]))
                for k in correct:
                    correct[k] += above < k
                if p < g:
                    genuine.append(sim_p[p, g])
    assert r["num_searches"] == searches == 2 * (3 + 1 + 6)
    # Exact: the same counts, every decisive score comparison separated (checked)
    mates = (p_lab[:, None] == p_lab[None, :]) & ~np.eye(10, dtype=bool)
    pairs = np.argwhere(mates)
    _assert_separated(sim_d[pairs[:, 0]], sim_p[pairs[:, 0], pairs[:, 1]][:, None], 6, "search")
    for k in (1, 10):
        assert r["id_at_rank"][k] == correct[k] / searches
    impostor = np.sort(sim_d.ravel())[::-1]
    k = math.floor(1e-2 * impostor.size)
    t = impostor[k]
    _assert_separated(t, impostor[[k - 1, k + 1]], 6, "threshold order")
    _assert_separated(genuine, t, 6, "genuine vs threshold")
    assert r["ver_tpr_at_fpr"][1e-2] == np.mean(np.array(genuine) > t)


@pytest.mark.parametrize("qc,ic", [(1024, 16384), (5, 7), (4, 1)])
def test_top_k_equals_argsort(qc, ic):
    rng = np.random.default_rng(6)
    q, items = rng.normal(size=(13, 5)), rng.normal(size=(31, 5))
    scores, idx = metrics.top_k(q, items, 6, query_chunk=qc, item_chunk=ic)
    sim = _unit(q) @ _unit(items).T
    ref = np.argsort(-sim, axis=1)[:, :6]
    np.testing.assert_array_equal(idx, ref)
    # float32 scores vs float64: the float64 inputs rounded to float32 (1 step) + the
    # 5-d cosine of _score_bound (3 x 5 + 4): terms 20, scale 1 (unit rows)
    assert_close(scores, np.take_along_axis(sim, ref, 1), terms=3 * 5 + 4 + 1, scale=1.0)


def test_top_k_leave_one_out():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(20, 4))
    _, idx = metrics.top_k(x, x, 3, query_chunk=6, item_chunk=9, exclude_same_index=True)
    sim = _unit(x) @ _unit(x).T
    np.fill_diagonal(sim, -np.inf)
    np.testing.assert_array_equal(idx, np.argsort(-sim, axis=1)[:, :3])


def test_bad_inputs_raise_clear_errors():
    e = np.ones((4, 3), np.float32)
    lab = np.arange(4)
    with pytest.raises(ValueError, match=r"probe_labels must have shape \[N\]=\[4\]"):
        metrics.identify(e, lab[:3], e, lab)
    with pytest.raises(ValueError, match="gallery_labels"):
        metrics.identify(e, lab, e, lab[:2])
    with pytest.raises(TypeError, match="integer"):
        metrics.identify(e, lab.astype(np.float32), e, lab)
    with pytest.raises(ValueError, match=r"rank must lie in \[1, 4\]"):
        metrics.identify(e, lab, e, lab, ranks=(1, 5))
    with pytest.raises(ValueError, match=r"rank must lie in \[1, 4\]"):
        metrics.identify(e, lab, e, lab, ranks=(0,))
    with pytest.raises(TypeError, match="ranks must be ints"):
        metrics.identify(e, lab, e, lab, ranks=(1.5,))
    with pytest.raises(ValueError, match="at least one rank"):
        metrics.identify(e, lab, e, lab, ranks=())
    with pytest.raises(ValueError, match="dimension D=3"):
        metrics.identify(e, lab, e, lab, distractor_emb=np.ones((5, 2), np.float32))
    with pytest.raises(ValueError, match="probe_chunk must be a positive int"):
        metrics.identify(e, lab, e, lab, ranks=(1,), probe_chunk=0)
    with pytest.raises(ValueError, match="fpr_targets"):
        metrics.identify(e, lab, e, lab, ranks=(1,), fpr_targets=(2.0,))
    with pytest.raises(TypeError, match="floating"):
        metrics.identify(lab[:, None], lab, e, lab)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        metrics.top_k(e, e, 4, exclude_same_index=True)
