"""Tests for kdface.losses._feature against float64 NumPy loops over the papers' formulas."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

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


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", None])
def test_matches_loop(name, reduction):
    s, t = _features(1)
    want = ref_per_example(name, s, t)
    want = {"mean": want.mean(), "sum": want.sum()}.get(reduction, want)
    got = LOSSES[name](jnp.asarray(s), jnp.asarray(t), reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_stage_feature_maps_are_flattened(name):
    s, t = _features(2, shape=(3, 2, 2, 4))
    got = LOSSES[name](jnp.asarray(s), jnp.asarray(t), reduction=None)
    np.testing.assert_allclose(got, ref_per_example(name, s, t), rtol=1e-5)


def test_unsquared_hint_is_the_norm_of_wang_eq5():
    s, t = _features(3)
    got = l2_hint_loss(jnp.asarray(s), jnp.asarray(t), squared=False, reduction=None)
    np.testing.assert_allclose(got, ref_per_example("l2", s, t, squared=False), rtol=1e-5)
    grad = jax.grad(lambda a: l2_hint_loss(a, jnp.asarray(s), squared=False))(jnp.asarray(s))
    np.testing.assert_array_equal(grad, np.zeros_like(s))  # s = t: gradient taken as 0


def test_known_answers():
    _, t = _features(4)
    scales = np.array([0.01, 0.5, 1.0, 7.0, 300.0], np.float32)[:, None]
    parallel = jnp.asarray(scales * t)
    for fn in (normalized_l2_loss, angular_distillation_loss):
        np.testing.assert_allclose(fn(parallel, jnp.asarray(t), reduction=None), np.zeros(N),
                                   atol=1e-6)
        # Opposite directions: ||u + u||^2 = 4 and (1 - (-1))^2 = 4.
        np.testing.assert_allclose(fn(-parallel, jnp.asarray(t), reduction=None), 4 * np.ones(N),
                                   rtol=1e-6)
    orthogonal_s = jnp.array([[3.0, 0.0]])
    orthogonal_t = jnp.array([[0.0, 0.2]])
    np.testing.assert_allclose(normalized_l2_loss(orthogonal_s, orthogonal_t), 2.0, rtol=1e-6)
    np.testing.assert_allclose(angular_distillation_loss(orthogonal_s, orthogonal_t), 1.0,
                               rtol=1e-6)
    np.testing.assert_allclose(l2_hint_loss(orthogonal_s, orthogonal_t), 9.04, rtol=1e-6)


def test_normalized_l2_is_twice_one_minus_cosine():
    s, t = _features(5)
    cos = np.sum(s * t, 1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))
    got = normalized_l2_loss(jnp.asarray(s), jnp.asarray(t), reduction=None)
    np.testing.assert_allclose(got, 2 * (1 - cos), rtol=1e-5)


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
