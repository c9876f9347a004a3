"""Tests for kdface.losses._metric: triplet loss by explicit triplet loops, landmark losses."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from _tolerance import assert_close

from kdface.losses import landmark_l2_loss, nrmse, triplet_loss

# Class 3 is a singleton: it is never an anchor with a positive, but is a negative for others.
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 3], np.int32)
N, D = len(LABELS), 4


def _embeddings(seed=0, n=N, d=D):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def ref_distance(x, i, j, distance):
    if i == j:
        return 0.0
    if distance == "cosine":
        dot = sum(a * b for a, b in zip(x[i], x[j]))
        return 1.0 - dot / (math.sqrt(sum(a * a for a in x[i])) * math.sqrt(sum(b * b
                                                                               for b in x[j])))
    sq = sum((a - b) ** 2 for a, b in zip(x[i], x[j]))
    return sq if distance == "squared_euclidean" else math.sqrt(sq)


def ref_triplet(emb, labels, *, margin, mining, distance, normalize, average_over):
    x = [[float(v) for v in row] for row in emb]
    if normalize:
        x = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in x]
    n = len(x)
    d = [[ref_distance(x, i, j, distance) for j in range(n)] for i in range(n)]
    if mining == "batch_all":
        losses = []
        for a in range(n):
            for p in range(n):
                for q in range(n):
                    if a != p and labels[a] == labels[p] and labels[a] != labels[q]:
                        losses.append(max(0.0, d[a][p] - d[a][q] + margin))
        if average_over == "active":
            losses = [v for v in losses if v > 0]
        return sum(losses) / len(losses) if losses else 0.0
    per_anchor = []
    for a in range(n):
        pos = [d[a][p] for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [d[a][q] for q in range(n) if labels[q] != labels[a]]
        if pos and neg:
            per_anchor.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def _triplet_terms_scale(emb, labels, *, margin, mining, distance, normalize):
    """(terms, scale) of the tolerance rule for a float32 triplet loss against the float64 loop.

    terms: the loss averages the hinges of every valid (anchor, positive, negative) triplet
    (batch_all) or of the N anchors (batch_hard), each hinge from D-term distances, after the
    D-term norm of ``normalize``: triplets + 2D. scale: the magnitude of a hinge's terms, the
    largest pairwise distance (float64) plus the margin.
    """
    x = np.asarray(emb, np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    d = np.array([[ref_distance(x, i, j, distance) for j in range(n)] for i in range(n)])
    same = labels[:, None] == labels[None, :]
    n_pos = same.sum(1) - 1
    n_neg = (~same).sum(1)
    triplets = int(np.sum(n_pos * n_neg)) if mining == "batch_all" else n
    return triplets + 2 * x.shape[1], float(d.max()) + margin


CASES = [("batch_all", "squared_euclidean", True, "active", 0.2),
         ("batch_all", "squared_euclidean", True, "valid", 1.0),
         ("batch_all", "euclidean", False, "active", 1.0),
         ("batch_all", "cosine", False, "valid", 0.2),
         ("batch_hard", "squared_euclidean", True, "active", 1.0),
         ("batch_hard", "euclidean", False, "active", 0.2),
         ("batch_hard", "cosine", True, "active", 0.2)]


@pytest.mark.parametrize("mining,distance,normalize,average_over,margin", CASES)
def test_triplet_matches_loop(mining, distance, normalize, average_over, margin):
    emb = _embeddings(1)
    kw = dict(margin=margin, mining=mining, distance=distance, normalize=normalize,
              average_over=average_over)
    want = ref_triplet(emb, LABELS, **kw)
    assert want > 0  # the case exercises the hinge
    got = jax.jit(functools.partial(triplet_loss, **kw))(jnp.asarray(emb), jnp.asarray(LABELS))
    # float32 vs the float64 loop: terms and scale derived in _triplet_terms_scale
    terms, scale = _triplet_terms_scale(emb, LABELS, margin=margin, mining=mining,
                                        distance=distance, normalize=normalize)
    assert_close(got, want, terms=terms, scale=scale)


@pytest.mark.parametrize("mining", ["batch_all", "batch_hard"])
def test_triplet_zero_when_classes_separated(mining):
    # Identities sit on distinct axes, samples within 0.01 of them: after normalization
    # d(a, p) ~ 1e-4 and d(a, n) ~ 2 (squared), far beyond the margin.
    rng = np.random.default_rng(2)
    centres = np.eye(D, dtype=np.float32)[LABELS % D] * 5.0
    emb = centres + 0.01 * rng.normal(size=(N, D)).astype(np.float32)
    loss = triplet_loss(jnp.asarray(emb), jnp.asarray(LABELS), mining=mining, margin=0.5)
    assert float(loss) == 0.0
    # Sanity: the same points with a margin larger than the gap give a positive loss.
    assert float(triplet_loss(jnp.asarray(emb), jnp.asarray(LABELS), mining=mining,
                              margin=3.0)) > 0.0


@pytest.mark.parametrize("mining", ["batch_all", "batch_hard"])
@pytest.mark.parametrize("labels", [np.zeros(N, np.int32), np.arange(N, dtype=np.int32)])
def test_triplet_without_valid_triplets_is_zero(mining, labels):
    emb = jnp.asarray(_embeddings(3))
    value, grad = jax.jit(jax.value_and_grad(
        lambda e: triplet_loss(e, jnp.asarray(labels), mining=mining)))(emb)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, np.zeros((N, D)))


@pytest.mark.parametrize("mining,distance", [("batch_all", "euclidean"),
                                             ("batch_hard", "euclidean"),
                                             ("batch_all", "squared_euclidean")])
def test_triplet_coincident_embeddings_have_finite_gradient(mining, distance):
    emb = _embeddings(4)
    emb[1] = emb[0]  # a positive pair at distance 0
    emb[3] = emb[0]  # a negative at distance 0
    grad = jax.jit(jax.grad(lambda e: triplet_loss(e, jnp.asarray(LABELS), mining=mining,
                                                   distance=distance)))(jnp.asarray(emb))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("mining,distance,normalize,average_over,margin", CASES[::2])
def test_triplet_grads_float64(mining, distance, normalize, average_over, margin):
    emb = _embeddings(5)
    with jax.enable_x64(True):
        y = jnp.asarray(LABELS)
        fn = jax.jit(lambda e: triplet_loss(e, y, margin=margin, mining=mining, distance=distance,
                                            normalize=normalize, average_over=average_over))
        check_grads(fn, (jnp.asarray(emb, jnp.float64),), order=1, modes=["rev"], eps=1e-6)


def test_triplet_bad_inputs():
    emb, y = jnp.asarray(_embeddings(8)), jnp.asarray(LABELS)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        triplet_loss(emb[0], y)
    with pytest.raises(ValueError, match="labels"):
        triplet_loss(emb, y[:-1])
    with pytest.raises(TypeError, match="integer"):
        triplet_loss(emb, y.astype(jnp.float32))
    with pytest.raises(TypeError, match="floating"):
        triplet_loss(emb.astype(jnp.int32), y)
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(emb, y, mining="semi_hard")
    with pytest.raises(ValueError, match="distance"):
        triplet_loss(emb, y, distance="manhattan")
    with pytest.raises(ValueError, match="average_over"):
        triplet_loss(emb, y, average_over="all")
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(emb, y, margin=-0.1)


# ----------------------------------------------------------------------------- landmarks

def ref_landmark_l2(pred, target):
    return np.array([0.5 * sum((float(a) - float(b)) ** 2 for a, b in zip(p.ravel(), t.ravel()))
                     for p, t in zip(pred, target)])


@pytest.mark.parametrize("reduction", ["mean", "sum", None])
def test_landmark_l2_matches_loop_in_both_layouts(reduction):
    rng = np.random.default_rng(9)
    pred = rng.normal(size=(4, 5, 2)).astype(np.float32)
    target = rng.normal(size=(4, 5, 2)).astype(np.float32)
    want = ref_landmark_l2(pred, target)
    want = {"mean": want.mean(), "sum": want.sum()}.get(reduction, want)
    got = landmark_l2_loss(jnp.asarray(pred), jnp.asarray(target), reduction=reduction)
    # float32 vs the float64 loop: 2K = 10 positive squares per image (+ N = 4 for a
    # reduction), scale = the value itself (all terms positive)
    terms = 10 if reduction is None else 10 + 4
    assert_close(got, want, terms=terms, scale=np.abs(want))
    flat = landmark_l2_loss(jnp.asarray(pred.reshape(4, 10)), jnp.asarray(target.reshape(4, 10)),
                            reduction=reduction)
    assert_close(flat, want, terms=terms, scale=np.abs(want))   # the same sums, other layout


def test_landmark_l2_gradient():  # jit / vmap / bf16: tests/test_losses_contract.py
    rng = np.random.default_rng(10)
    pred = jnp.asarray(rng.normal(size=(4, 5, 2)).astype(np.float32))
    target = jnp.asarray(rng.normal(size=(4, 5, 2)).astype(np.float32))
    grad = jax.grad(lambda p: landmark_l2_loss(p, target, reduction="sum"))(pred)
    # d/dp of 1/2 ||p - t||^2 = p - t: one float32 subtraction per element against the
    # float64 difference: 1 term, scale = the element itself
    want = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    assert_close(grad, want, terms=1, scale=np.abs(want))
    with jax.enable_x64(True):
        t64 = jnp.asarray(target, jnp.float64)
        check_grads(jax.jit(lambda p: landmark_l2_loss(p, t64)), (jnp.asarray(pred, jnp.float64),),
                    order=1, modes=["rev"])


def test_nrmse_hand_computed():
    # Eyes at (0, 0) and (10, 0): d = 10. Point errors 5 (3-4-5), 0, 1 -> mean 2 -> 0.2.
    target = np.array([[[0, 0], [10, 0], [5, 5]],
                       [[0, 0], [0, 4], [2, 2]]], np.float32)
    pred = target + np.array([[[3, 4], [0, 0], [0, 1]],
                              [[0, 0], [0, 2], [0, 0]]], np.float32)
    # Second image: d = 4, errors 0, 2, 0 -> mean 2/3 -> 1/6.
    per_image = nrmse(jnp.asarray(pred), jnp.asarray(target), reduction=None)
    # exact answers in float64: the mean of K = 3 point errors, each a 2-term hypot, over a
    # 2-term eye distance: 3 + 2 + 2 terms, scale = the value (positive terms); +2 for the mean
    want = np.array([0.2, 1 / 6])
    assert_close(per_image, want, terms=3 + 2 + 2, scale=want)
    assert_close(nrmse(jnp.asarray(pred), jnp.asarray(target)), want.mean(), terms=3 + 2 + 2 + 2,
                 scale=want.mean())
    # Bounding-box diagonal: image 0 box 10 x 5 -> sqrt(125); image 1 box 2 x 4 -> sqrt(20).
    bbox = nrmse(jnp.asarray(pred), jnp.asarray(target), normalization="bbox_diagonal",
                 reduction=None)
    # as above, the box diagonal a 2-term hypot of exact min/max differences
    want_bbox = np.array([2 / math.sqrt(125), (2 / 3) / math.sqrt(20)])
    assert_close(bbox, want_bbox, terms=3 + 2 + 2, scale=want_bbox)
    # Interleaved [N, 2K] layout gives the same numbers.
    # the same computation on another layout, float32 vs float32: 2 x the terms
    assert_close(nrmse(jnp.asarray(pred.reshape(2, 6)), jnp.asarray(target.reshape(2, 6)),
                       reduction=None), per_image, terms=2 * (3 + 2 + 2), scale=want)


def test_nrmse_inter_pupil_matches_loop():
    rng = np.random.default_rng(11)
    target = rng.uniform(0, 100, size=(3, 8, 2)).astype(np.float32)
    pred = target + rng.normal(size=(3, 8, 2)).astype(np.float32)
    left, right = (0, 1, 2), (4, 5)
    want = []
    for p, t in zip(pred.astype(np.float64), target.astype(np.float64)):
        lc = [sum(t[i][a] for i in left) / len(left) for a in range(2)]
        rc = [sum(t[i][a] for i in right) / len(right) for a in range(2)]
        d = math.hypot(lc[0] - rc[0], lc[1] - rc[1])
        want.append(sum(math.hypot(*(p[k] - t[k])) for k in range(8)) / 8 / d)
    got = nrmse(jnp.asarray(pred), jnp.asarray(target), normalization="inter_pupil",
                left_eye=left, right_eye=right, reduction=None)
    # float32 vs the float64 loop: K = 8 point errors (2-term hypots of exact differences:
    # Sterbenz, p within 2x of t), over the distance of two eye centres (means of 3 and 2
    # points, then a 2-term hypot): 8 + 3 + 2 terms. The centres' difference cancels, so its
    # error is measured against the coordinates (max|t| <= 100), not the distance d: scale =
    # value * (1 + max|t| / d).
    want = np.array(want)
    d = [math.hypot(*(t[list(left)].mean(0) - t[list(right)].mean(0)))
         for t in target.astype(np.float64)]
    scale = want * (1 + np.abs(target).max((1, 2)) / np.array(d))
    assert_close(got, want, terms=8 + 3 + 2, scale=scale)
    got = jax.jit(lambda p, t: nrmse(p, t, left_eye=2, right_eye=6))(pred, target)
    eager = nrmse(jnp.asarray(pred), jnp.asarray(target), left_eye=2, right_eye=6)
    # float32 vs float32 (fused vs op by op), the batch mean of 3 images: 2 x (8 + 2 + 2 + 3)
    # terms, scale = the value times (1 + coordinates / eye distance) as above
    d = np.hypot(*(target[:, 2] - target[:, 6]).T.astype(np.float64))
    assert_close(got, eager, terms=2 * (8 + 2 + 2 + 3),
                 scale=float(eager) * (1 + float(np.abs(target).max() / d.min())))


def test_landmark_bad_inputs():
    x = jnp.ones((2, 5, 2))
    with pytest.raises(ValueError, match="same shape"):
        landmark_l2_loss(x, x[:1])
    with pytest.raises(ValueError, match=r"\[N, K, 2\] or \[N, 2K\]"):
        landmark_l2_loss(jnp.ones((2, 5)), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"\[N, K, 2\] or \[N, 2K\]"):
        nrmse(jnp.ones((2, 5, 3)), jnp.ones((2, 5, 3)))
    with pytest.raises(TypeError, match="floating"):
        landmark_l2_loss(jnp.ones((2, 5, 2), jnp.int32), x)
    with pytest.raises(ValueError, match="normalization"):
        nrmse(x, x, normalization="face_size")
    with pytest.raises(ValueError, match="out of range"):
        nrmse(x, x, right_eye=5)
    with pytest.raises(TypeError, match="left_eye"):
        nrmse(x, x, left_eye=(0, 1))  # sequences only for 'inter_pupil'
    with pytest.raises(ValueError, match="reduction"):
        nrmse(x, x, reduction="median")
