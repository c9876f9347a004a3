"""Tests for kdface.metrics alignment NRMSE and nearest-neighbour verification."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kdface import losses, metrics

from _tolerance import assert_close

F64 = np.float64


def _two_images():
    # image 0: eyes (0,0),(10,0) -> d=10; point errors 5, 0, 10, 0, 0 -> mean 3 -> 0.3
    # image 1: eyes (0,0),(20,0) -> d=20; every point off by (0, 2) -> mean 2 -> 0.1
    t0 = np.array([[0, 0], [10, 0], [5, 5], [2, 9], [8, 9]], np.float64)
    p0 = t0 + np.array([[3, 4], [0, 0], [6, 8], [0, 0], [0, 0]])
    t1 = 2.0 * t0
    p1 = t1 + np.array([0.0, 2.0])
    return np.stack([p0, p1]), np.stack([t0, t1])


def test_nrmse_hand_computed():
    pred, target = _two_images()
    r = metrics.nrmse_dataset(pred, target)
    # float64: 5 point errors (hypot of integer offsets) summed, divided by d: terms 5, |x| <= 1
    assert_close(r["per_sample"], [0.3, 0.1], terms=5, scale=1.0, dtype=F64)
    assert_close(r["nrmse"], 0.2, terms=5 + 2, scale=1.0, dtype=F64)  # + the 2-image mean
    assert r["failure_rate"] == 0.5                     # 0.1 is not a failure (> 0.1 is)
    grid, frac = r["ced"]["errors"], r["ced"]["fraction"]
    assert frac[0] == 0.0 and frac[np.searchsorted(grid, 0.15)] == 0.5 and frac[-1] == 0.5
    # interleaved [N, 2K] layout gives the same
    flat = metrics.nrmse_dataset(pred.reshape(2, 10), target.reshape(2, 10))
    assert flat["nrmse"] == r["nrmse"]  # the same numbers in another layout: exact


def _literal_nrmse(pred, target, norm_fn):
    out = []
    for p, t in zip(pred, target):
        errs = [np.hypot(*(p[k] - t[k])) for k in range(len(p))]
        out.append(sum(errs) / len(errs) / norm_fn(t))
    return np.array(out)


@pytest.mark.parametrize("normalization", ["inter_ocular", "inter_pupil", "bbox_diagonal"])
def test_nrmse_literal_loop_and_matches_loss(normalization):
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 112, size=(7, 68, 2))
    pred = target + rng.normal(scale=3.0, size=target.shape)
    if normalization == "inter_ocular":
        eyes = dict(left_eye=36, right_eye=45)
        norm_fn = lambda t: np.hypot(*(t[36] - t[45]))               # noqa: E731
    elif normalization == "inter_pupil":
        eyes = dict(left_eye=range(36, 42), right_eye=range(42, 48))
        norm_fn = lambda t: np.hypot(*(t[36:42].mean(0) - t[42:48].mean(0)))  # noqa: E731
    else:
        eyes = {}
        norm_fn = lambda t: np.hypot(*(t.max(0) - t.min(0)))         # noqa: E731
    r = metrics.nrmse_dataset(pred, target, normalization=normalization, **eyes)
    ref = _literal_nrmse(pred, target, norm_fn)
    # float64 vs a float64 loop in another order (both carry error): 68 positive point errors
    # summed plus the normalizer (<= 6-point eye means and a hypot: 8 steps), terms 2 x 76;
    # no cancellation in a sum of positive errors, so each image's own value is its scale
    assert_close(r["per_sample"], ref, terms=2 * (68 + 8), scale=ref, dtype=F64)
    # the evaluation metric and the differentiable loss agree: float32 loss vs the float64
    # reference. The ~3 px offsets are differences of coordinates up to 112 px, rounded to
    # float32 first, so each point error carries eps32 x |coordinate|: the scale is
    # max|coordinate| / normalizer per image; terms as above (68 errors + the normalizer)
    loss = losses.nrmse(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                        normalization=normalization, reduction=None, **eyes)
    coord = np.maximum(np.abs(pred), np.abs(target)).max(axis=(1, 2))
    assert_close(np.asarray(loss), ref, terms=68 + 8, scale=coord / np.array(
        [norm_fn(t) for t in target]))


def test_nrmse_bad_inputs():
    pred, target = _two_images()
    with pytest.raises(ValueError, match="same shape"):
        metrics.nrmse_dataset(pred, target[:1])
    with pytest.raises(ValueError, match=r"\[N, K, 2\] or \[N, 2K\]"):
        metrics.nrmse_dataset(pred.reshape(2, 5, 2, 1), target.reshape(2, 5, 2, 1))
    with pytest.raises(ValueError, match="normalization must be one of"):
        metrics.nrmse_dataset(pred, target, normalization="pupil")
    with pytest.raises(ValueError, match="out of range for K=5"):
        metrics.nrmse_dataset(pred, target, right_eye=5)
    with pytest.raises(ValueError, match="distance of the ground truth is 0"):
        metrics.nrmse_dataset(pred, np.zeros_like(target))
    with pytest.raises(TypeError, match="floating"):
        metrics.nrmse_dataset(pred.astype(np.int32), target)


def test_nearest_neighbour_hand_computed():
    # 1-D points: 0<->1 same id (right), 10 and 11.5 nearest to each other but differ (wrong),
    # 30's nearest is 11.5, same id (right) -> 3/5.
    x = np.array([[0.0], [1.0], [10.0], [11.5], [30.0]])
    r = metrics.nearest_neighbour_verification(x, np.array([0, 0, 1, 2, 2]), chunk=2)
    np.testing.assert_array_equal(r["nearest"], [1, 0, 3, 2, 3])
    assert r["top1_accuracy"] == 3 / 5  # a count / 5: exact
    assert r["num_singletons"] == 1
    skip = metrics.nearest_neighbour_verification(x, np.array([0, 0, 1, 2, 2]),
                                                  skip_singletons=True)
    assert skip["top1_accuracy"] == 3 / 4 and skip["num_evaluated"] == 4  # exact count / 4


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_nearest_neighbour_equals_brute_force(metric, chunk):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 45)
    x = rng.normal(size=(6, 5))[labels] + 0.8 * rng.normal(size=(45, 5))
    x *= rng.uniform(0.5, 2.0, size=(45, 1))          # norms matter for euclidean only
    r = metrics.nearest_neighbour_verification(x, labels, metric=metric, chunk=chunk)
    y = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
    nearest = []
    for i in range(45):
        dist = [np.inf if j == i else np.sum((y[i] - y[j]) ** 2) for j in range(45)]
        nearest.append(int(np.argmin(dist)))
    np.testing.assert_array_equal(r["nearest"], nearest)
    # the same neighbours (asserted above), so the same count / 45: exact
    assert r["top1_accuracy"] == np.mean(labels[nearest] == labels)


def test_nearest_neighbour_bad_inputs():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\]=\[4\]"):
        metrics.nearest_neighbour_verification(x, np.arange(3))
    with pytest.raises(TypeError, match="integer"):
        metrics.nearest_neighbour_verification(x, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="metric must be one of"):
        metrics.nearest_neighbour_verification(x, np.arange(4), metric="l1")
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.nearest_neighbour_verification(x[:1], np.arange(1))


@pytest.mark.parametrize("eyes", [dict(left_eye=np.int64(0), right_eye=1),
                                  dict(normalization="inter_pupil", left_eye=[0, np.int32(2)],
                                       right_eye=range(1, 2))])
def test_nrmse_metric_and_loss_parse_eye_indices_alike(eyes):
    pred, target = _two_images()
    got = metrics.nrmse_dataset(pred, target, **eyes)["per_sample"]
    loss = losses.nrmse(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                        reduction=None, **eyes)
    # float32 loss vs the float64 metric: 5 point errors + the normalizer (an eye mean of <= 2
    # points and a hypot: 4 steps), terms 9; the coordinates (<= 26 px, exact in float32) over
    # each image's normalizer d (mean point error / metric) bound the terms: scale max|p, t| / d
    coord = np.maximum(np.abs(pred), np.abs(target)).max(axis=(1, 2))
    d = np.hypot(*np.moveaxis(pred - target, -1, 0)).mean(axis=1) / got
    assert_close(np.asarray(loss), got, terms=5 + 4, scale=coord / d)


@pytest.mark.parametrize("bad", [dict(left_eye=True), dict(left_eye=0.0),
                                 dict(left_eye=[0, 2]),                       # inter_ocular: one
                                 dict(normalization="inter_pupil", left_eye=[]),
                                 dict(normalization="inter_pupil", left_eye=[0, 1.0])])
def test_nrmse_metric_and_loss_reject_the_same_eye_indices(bad):
    pred, target = _two_images()
    with pytest.raises(TypeError, match="left_eye must be an int") as from_metric:
        metrics.nrmse_dataset(pred, target, **bad)
    with pytest.raises(TypeError, match="left_eye must be an int") as from_loss:
        losses.nrmse(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), **bad)
    assert str(from_metric.value) == str(from_loss.value)
