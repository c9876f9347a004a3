"""Tests for kdface.losses._feature against float64 NumPy loops over the papers' formulas."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from _tolerance import EPS32, assert_close

from kdface.losses import angular_distillation_loss, l2_hint_loss, normalized_l2_loss

N, D = 5, 6
LOSSES = {"l2": l2_hint_loss, "normalized": normalized_l2_loss,
          "angular": angular_distillation_loss}


def _features(seed=0, shape=(N, D)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape).astype(np.float32),
            rng.normal(size=shape).astype(np.float32))


def ref_per_example(name, student, teacher, squared=True):
    out = []
    for s_row, t_row in zip(student.reshape(len(student), -1), teacher.reshape(len(teacher), -1)):
        s_row = [float(v) for v in s_row]
        t_row = [float(v) for v in t_row]
        s_norm = math.sqrt(sum(v * v for v in s_row))
        t_norm = math.sqrt(sum(v * v for v in t_row))
        if name == "l2":
            sq = sum((a - b) ** 2 for a, b in zip(s_row, t_row))
            out.append(sq if squared else math.sqrt(sq))
        elif name == "normalized":  # Yan et al. 2019 eq. (5)
            out.append(sum((a / s_norm - b / t_norm) ** 2 for a, b in zip(s_row, t_row)))
        else:  # Duong et al. 2019 eq. (4)
            cos = sum(a * b for a, b in zip(s_row, t_row)) / (s_norm * t_norm)
            out.append((1.0 - cos) ** 2)
    return np.array(out)


def _terms_scale(name, want, d, reduction=None):
    """(terms, scale) of the tolerance rule for a float32 loss against the float64 loop.

    l2: D squared differences summed per example, all positive: scale = the value itself.
    normalized / angular: the norm's D-term sum, then the loss's D-term sum (2D terms); the
    terms are built from unit vectors, |u_i - v_i| <= |u_i| + |v_i| and sum (|u| + |v|)^2 <= 4,
    so the scale is 4 (the loss's range), not the value (which cancels to ~0 for near-parallel
    features). A reduction over the N examples adds N terms and sums (or averages) the scales.
    """
    terms = d if name == "l2" else 2 * d
    rows = np.abs(want) if name == "l2" else np.full(np.shape(want)[:1] or (1,), 4.0)
    if reduction is None:
        return terms, rows
    n = N
    return terms + n, float(rows.sum() if reduction == "sum" else rows.mean())


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", None])
def test_matches_loop(name, reduction):
    s, t = _features(1)
    rows = ref_per_example(name, s, t)
    want = {"mean": rows.mean(), "sum": rows.sum()}.get(reduction, rows)
    got = LOSSES[name](jnp.asarray(s), jnp.asarray(t), reduction=reduction)
    # float32 vs the float64 loop: terms and scale derived in _terms_scale (D, then N terms)
    terms, scale = _terms_scale(name, rows, D, reduction)
    assert_close(got, want, terms=terms, scale=scale)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_stage_feature_maps_are_flattened(name):
    s, t = _features(2, shape=(3, 2, 2, 4))
    got = LOSSES[name](jnp.asarray(s), jnp.asarray(t), reduction=None)
    want = ref_per_example(name, s, t)
    # float32 vs the float64 loop over the flattened H*W*C = 16 elements (see _terms_scale)
    terms, scale = _terms_scale(name, want, 2 * 2 * 4)
    assert_close(got, want, terms=terms, scale=scale)


def test_unsquared_hint_is_the_norm_of_wang_eq5():
    s, t = _features(3)
    got = l2_hint_loss(jnp.asarray(s), jnp.asarray(t), squared=False, reduction=None)
    # float32 vs the float64 loop: sqrt of a D-term positive sum, scale = the norm itself
    want = ref_per_example("l2", s, t, squared=False)
    assert_close(got, want, terms=D, scale=want)
    grad = jax.grad(lambda a: l2_hint_loss(a, jnp.asarray(s), squared=False))(jnp.asarray(s))
    np.testing.assert_array_equal(grad, np.zeros_like(s))  # s = t: gradient taken as 0


def test_known_answers():
    _, t = _features(4)
    scales = np.array([0.01, 0.5, 1.0, 7.0, 300.0], np.float32)[:, None]
    parallel = jnp.asarray(scales * t)
    for fn in (normalized_l2_loss, angular_distillation_loss):
        # Parallel: the exact answer 0. What is left is the square of the rounding of the two
        # directions (each unit-vector entry off by <= 2D eps |u_i|, sum u_i^2 = 1), so the
        # bound is (2D eps)^2 = eps * (2D)^2 terms * scale eps: second order, not 4 * 2D eps.
        assert_close(fn(parallel, jnp.asarray(t), reduction=None), np.zeros(N),
                     terms=(2 * D) ** 2, scale=EPS32)
        # Opposite directions: ||u + u||^2 = 4 and (1 - (-1))^2 = 4; 2D terms, scale 4 (the value)
        assert_close(fn(-parallel, jnp.asarray(t), reduction=None), 4 * np.ones(N),
                     terms=2 * D, scale=4.0)
    orthogonal_s = jnp.array([[3.0, 0.0]])
    orthogonal_t = jnp.array([[0.0, 0.2]])
    # D = 2: the norms' 2-term sums then the loss's 2-term sum (4 terms), scale 4 (the range)
    assert_close(normalized_l2_loss(orthogonal_s, orthogonal_t), 2.0, terms=2 * 2, scale=4.0)
    assert_close(angular_distillation_loss(orthogonal_s, orthogonal_t), 1.0, terms=2 * 2,
                 scale=4.0)
    # 3^2 + 0.2^2 with 0.2 as the float32 input holds it; 2 positive terms, scale = the value
    want = 9.0 + float(np.float32(0.2)) ** 2
    assert_close(l2_hint_loss(orthogonal_s, orthogonal_t), want, terms=2, scale=want)


def test_normalized_l2_is_twice_one_minus_cosine():
    s, t = _features(5)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)   # the identity evaluated in float64
    cos = np.sum(s64 * t64, 1) / (np.linalg.norm(s64, axis=1) * np.linalg.norm(t64, axis=1))
    got = normalized_l2_loss(jnp.asarray(s), jnp.asarray(t), reduction=None)
    # float32 vs float64: 2D terms (norm, then loss sum), scale 4 (see _terms_scale)
    assert_close(got, 2 * (1 - cos), terms=2 * D, scale=4.0)


def test_zero_feature_is_finite():
    s, t = _features(6)
    s[0] = 0.0
    for fn in (normalized_l2_loss, angular_distillation_loss):
        value, grad = jax.value_and_grad(fn)(jnp.asarray(s), jnp.asarray(t))
        assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_grads(name):
    fn = LOSSES[name]
    s, t = _features(7)
    with jax.enable_x64(True):
        t64 = jnp.asarray(t, jnp.float64)
        check_grads(jax.jit(lambda a: fn(a, t64)), (jnp.asarray(s, jnp.float64),), order=1,
                    modes=["rev", "fwd"])
    g_teacher = jax.grad(lambda b: fn(jnp.asarray(s), b))(jnp.asarray(t))
    np.testing.assert_array_equal(g_teacher, np.zeros_like(t))  # teacher is frozen


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bad_inputs(name):
    fn = LOSSES[name]
    s, t = _features(9)
    s, t = jnp.asarray(s), jnp.asarray(t)
    with pytest.raises(ValueError, match="same shape"):
        fn(s, t[:-1])
    with pytest.raises(ValueError, match="same shape"):
        fn(s, t[:, :-1])
    with pytest.raises(ValueError, match=r"\[N, D\] or \[N, H, W, C\]"):
        fn(s[0], t[0])
    with pytest.raises(ValueError, match=r"\[N, D\] or \[N, H, W, C\]"):
        fn(s[:, :, None], t[:, :, None])
    with pytest.raises(TypeError, match="floating"):
        fn(s.astype(jnp.int32), t)
    with pytest.raises(ValueError, match="reduction"):
        fn(s, t, reduction="avg")
