"""Tests for kdface.losses._classification against float64 NumPy loops over the formulas."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from _tolerance import assert_close

from kdface.losses import (arcface_logits, cosface_logits, margin_cross_entropy,
                           softmax_cross_entropy, sphereface_lambda, sphereface_logits)

N, C = 6, 5


def _data(seed=0, n=N, c=C, low=-0.95, high=0.95):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(low, high, (n, c)).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    return cos, labels


# ----------------------------------------------------------------------------- references

def ref_cross_entropy(logits, labels):
    out = []
    for row, y in zip(np.asarray(logits, np.float64), labels):
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        out.append(log_z - row[y])
    return np.array(out)


def ref_cosface(cos, labels, s, m):
    out = np.zeros(cos.shape)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            out[i, j] = s * (float(cos[i, j]) - (m if j == labels[i] else 0.0))
    return out


def ref_arcface(cos, labels, s, m, easy_margin):
    out = np.zeros(cos.shape)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            c = float(cos[i, j])
            if j == labels[i]:
                theta = math.acos(c)
                if easy_margin:
                    c = math.cos(theta + m) if c > 0 else c
                else:
                    c = math.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)
            out[i, j] = s * c
    return out


def ref_sphereface(cos, labels, norms, m, lam):
    out = np.zeros(cos.shape)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            c = float(cos[i, j])
            if j == labels[i]:
                theta = math.acos(c)
                k = min(int(m * theta // math.pi), m - 1)
                psi = (-1) ** k * math.cos(m * theta) - 2 * k
                c = (lam * c + psi) / (1 + lam)
            out[i, j] = norms[i] * c
    return out


def _ce_row_scale(logits):
    """Magnitude of the terms a cross-entropy row is built from: the logits and the row's
    log-sum-exp (<= max|x| + log C); the value lse - x_y cancels below them."""
    x = np.abs(np.asarray(logits, np.float64))
    return x.max(1) + math.log(x.shape[1])


# ----------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("reduction", ["mean", "sum", "none", None])
def test_cross_entropy_matches_loop(reduction):
    rng = np.random.default_rng(1)
    logits = (3 * rng.normal(size=(N, C))).astype(np.float32)
    labels = rng.integers(0, C, N).astype(np.int32)
    want = ref_cross_entropy(logits, labels)
    want = {"mean": want.mean(), "sum": want.sum()}.get(reduction, want)
    got = softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), reduction=reduction)
    # float32 vs the float64 loop: the row's C-term log-sum-exp, scale _ce_row_scale; a
    # reduction adds N terms and sums (or averages) the rows' scales
    rows = _ce_row_scale(logits)
    if reduction in ("none", None):
        assert_close(got, want, terms=C, scale=rows)
    else:
        assert_close(got, want, terms=C + N,
                     scale=float(rows.sum() if reduction == "sum" else rows.mean()))
    assert margin_cross_entropy is softmax_cross_entropy          # one function, two names


def test_cross_entropy_large_logits_stable():
    logits = jnp.array([[1000.0, 0.0, -1000.0]])
    # exact answer 1000 (lse = 1000 + log(1 + e^-1000 + e^-2000)); 3 terms, scale max|x| = 1000
    assert_close(softmax_cross_entropy(logits, jnp.array([1])), 1000.0, terms=3, scale=1000.0)


def test_cross_entropy_grad_is_softmax_minus_onehot():
    cos, labels = _data(2)
    logits = jnp.asarray(3 * cos)
    grad = jax.grad(lambda x: softmax_cross_entropy(x, labels, reduction="sum"))(logits)
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(N), labels] -= 1.0
    # float32 vs float64: p = exp(x - lse) carries the absolute error of the C-term lse, so
    # each entry is bounded by C eps times the row scale (max|x| + log C) times p <= 1
    assert_close(grad, p, terms=C, scale=_ce_row_scale(x)[:, None])


# ----------------------------------------------------------------------------- margin heads

@pytest.mark.parametrize("margin", [0.0, 0.35])
def test_cosface_matches_loop(margin):
    cos, labels = _data(3)
    got = cosface_logits(jnp.asarray(cos), jnp.asarray(labels), scale=64.0, margin=margin)
    # float32 vs float64, per element: s (c - m [j == y]), a difference then a product (2
    # terms), scale s (|c| + m)
    assert_close(got, ref_cosface(cos, labels, 64.0, margin), terms=2,
                 scale=64.0 * (np.abs(cos.astype(np.float64)) + margin))
    if margin == 0.0:
        # exact: c - 0 * onehot = c, and the scale 64 is a power of two
        np.testing.assert_array_equal(got, 64.0 * cos)


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcface_matches_loop(easy_margin):
    cos, labels = _data(4, n=40, low=-1.0, high=1.0)
    # Exercise both sides of the fallback thresholds cos(pi - m) and 0 and the end points.
    cos[0, labels[0]] = 1.0
    cos[1, labels[1]] = -1.0
    cos[2, labels[2]] = math.cos(math.pi - 0.5) - 0.01
    cos[3, labels[3]] = math.cos(math.pi - 0.5) + 0.01
    cos[4, labels[4]] = -0.01
    cos[5, labels[5]] = 0.999999
    got = arcface_logits(jnp.asarray(cos), jnp.asarray(labels), scale=64.0, margin=0.5,
                         easy_margin=easy_margin)
    want = ref_arcface(cos, labels, 64.0, 0.5, easy_margin)
    # float32 vs float64, per element. The target is c cos m - sin(theta) sin m with sin(theta)
    # = sqrt((1 - c)(1 + c)) (relative error a few eps, no cancellation near c = +-1), or the
    # fallback c - m sin m: the products, the sqrt, (1 - c)(1 + c) and the difference, 4 terms,
    # each of magnitude <= s (|c| + 1); other classes s c, exact (64 is a power of two).
    assert_close(got, want, terms=4, scale=64.0 * (np.abs(cos.astype(np.float64)) + 1.0))


def test_arcface_zero_margin_is_scaled_cosine():
    cos, labels = _data(5)
    got = arcface_logits(jnp.asarray(cos), jnp.asarray(labels), scale=30.0, margin=0.0)
    # m = 0: c cos 0 - sin(theta) sin 0 = c exactly, then one rounding of s c: 1 term, scale |s c|
    want = 30.0 * cos.astype(np.float64)
    assert_close(got, want, terms=1, scale=np.abs(want))


def test_arcface_gradient_finite_at_plus_minus_one():
    cos = jnp.array([[1.0, 0.2, -1.0], [-1.0, 1.0, 0.3], [1.0 + 1e-7, 0.0, 0.0]])
    labels = jnp.array([0, 0, 0])

    def loss(c):
        return softmax_cross_entropy(arcface_logits(c, labels), labels)

    jac_easy = jax.jit(jax.jacrev(lambda c: arcface_logits(c, labels, easy_margin=True)))(cos)
    assert np.all(np.isfinite(jac_easy))
    grad = jax.jit(jax.grad(loss))(cos)
    assert np.all(np.isfinite(grad))
    # At cos = 1 the target logit's derivative is s cos m (sin θ's infinite slope taken as 0);
    # at cos = -1 the fallback branch cos θ - m sin m has slope s.
    jac = jax.jit(jax.jacrev(lambda c: arcface_logits(c, labels)))(cos)
    assert np.all(np.isfinite(jac))
    # s cos m with cos m rounded to float32 once: 1 term, scale the value
    assert_close(jac[0, 0, 0, 0], 64 * math.cos(0.5), terms=1, scale=64 * math.cos(0.5))
    assert float(jac[1, 0, 1, 0]) == 64.0   # exact: d(c - m sin m)/dc = 1, times 64


def test_margin_head_grads_float64():
    cos, labels = _data(6)
    norms = np.random.default_rng(6).uniform(0.5, 3.0, N)
    with jax.enable_x64(True):
        c = jnp.asarray(cos, jnp.float64)
        y = jnp.asarray(labels)
        r = jnp.asarray(norms)
        # jit keeps the many finite-difference evaluations cheap.
        check_grads(jax.jit(lambda c: cosface_logits(c, y)), (c,), order=1, modes=["rev"])
        check_grads(jax.jit(lambda c: arcface_logits(c, y)), (c,), order=1, modes=["rev"])
        check_grads(jax.jit(lambda c, r: sphereface_logits(c, y, feature_norm=r, lambda_=2.0)),
                    (c, r), order=1, modes=["rev"])
        check_grads(jax.jit(lambda c: softmax_cross_entropy(arcface_logits(c, y), y)), (c,),
                    order=1, modes=["rev"])


def _sphereface_terms_scale(cos, norms, margin, lam):
    """(terms, scale) for SphereFace logits against the float64 loop. The target's cos(m theta)
    is the Chebyshev recurrence T_{k+1} = 2c T_k - T_{k-1}: the local rounding of step k (terms
    of magnitude <= 3) is carried to T_m by U_{m-k} (|U_j| <= j + 1), so T_m's error grows as
    m^2 eps x 3; psi adds 2k <= 2(m - 1) and the lambda blend lambda |c|: terms m^2 + 2, scale
    ||x|| (3 + 2(m - 1) + lambda) / (1 + lambda) for each row. Other classes: ||x|| c, 1 term."""
    return margin * margin + 2, (np.asarray(norms, np.float64)[:, None]
                                 * (3.0 + 2.0 * (margin - 1) + lam) / (1.0 + lam)
                                 * np.ones(np.shape(cos)))


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_sphereface_matches_loop(margin, lam):
    cos, labels = _data(7, n=30, low=-1.0, high=1.0)
    cos[0, labels[0]] = 1.0
    cos[1, labels[1]] = -1.0
    norms = np.random.default_rng(7).uniform(0.5, 20.0, 30).astype(np.float32)
    got = sphereface_logits(jnp.asarray(cos), jnp.asarray(labels), feature_norm=jnp.asarray(norms),
                            margin=margin, lambda_=lam)
    want = ref_sphereface(cos, labels, norms, margin, lam)
    # float32 vs float64, per element (see _sphereface_terms_scale)
    terms, scale = _sphereface_terms_scale(cos, norms, margin, lam)
    assert_close(got, want, terms=terms, scale=scale)


def test_sphereface_defaults_and_traced_lambda():
    cos, labels = _data(8)
    got = sphereface_logits(jnp.asarray(cos), jnp.asarray(labels))
    terms, scale = _sphereface_terms_scale(cos, np.ones(N), 4, 0.0)   # float32 vs float64
    assert_close(got, ref_sphereface(cos, labels, np.ones(N), 4, 0.0), terms=terms, scale=scale)

    @jax.jit
    def at_step(step):
        return sphereface_logits(jnp.asarray(cos), jnp.asarray(labels),
                                 lambda_=sphereface_lambda(step))

    lam = 1000.0 / (1 + 0.12 * 50)
    want = ref_sphereface(cos, labels, np.ones(N), 4, lam)
    # float32 vs float64 (see _sphereface_terms_scale), plus lambda's own float32 schedule (3
    # terms, see test_sphereface_lambda_schedule) entering the blend
    terms, scale = _sphereface_terms_scale(cos, np.ones(N), 4, lam)
    assert_close(at_step(50), want, terms=terms + 3, scale=scale)


def test_sphereface_margin_one_is_plain_cosine_and_grads_finite():
    cos, labels = _data(9)
    got = sphereface_logits(jnp.asarray(cos), jnp.asarray(labels), margin=1)
    # m = 1: T_1(c) = c, k = 0, (0 c + c) / 1 and ||x|| = 1: c exactly
    np.testing.assert_array_equal(got, cos)
    edge = jnp.array([[1.0, 0.0], [-1.0, 0.5]])
    jac = jax.jit(jax.jacrev(lambda c: sphereface_logits(c, jnp.array([0, 0]))))(edge)
    assert np.all(np.isfinite(jac))
    # T_4'(1) = m^2 = 16, exact: the recurrence's derivative at c = 1 is integer arithmetic
    assert float(jac[0, 0, 0, 0]) == 16.0


def _lambda_close(got, want, x, power):
    """float32 base (1 + gamma step)^(-power) vs float64: the sum 1 + gamma step, the power (as
    exp(-power log x), whose error is eps times |power log x| plus the exp's and the log's),
    the product: 3 terms, scale the value times (1 + |power log x|)."""
    want = np.asarray(want, np.float64)
    assert_close(got, want, terms=3, scale=np.abs(want) * (1 + np.abs(power * np.log(x))))


def test_sphereface_lambda_schedule():
    _lambda_close(sphereface_lambda(0), 1000.0, 1.0, 1.0)
    _lambda_close(sphereface_lambda(100), 1000.0 / 13.0, 13.0, 1.0)
    _lambda_close(sphereface_lambda(10**6), 5.0, 1 + 0.12e6, 1.0)   # the floor
    _lambda_close(sphereface_lambda(10, base=10.0, gamma=1.0, power=2.0, lambda_min=0.0),
                  10.0 / 121.0, 11.0, 2.0)
    steps = jnp.arange(0, 3000, 500)
    vals = jax.jit(jax.vmap(sphereface_lambda))(steps)
    want = [max(5.0, 1000.0 / (1 + 0.12 * s)) for s in range(0, 3000, 500)]
    _lambda_close(vals, want, 1 + 0.12 * np.arange(0, 3000, 500), 1.0)


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs():
    cos, labels = _data(11)
    c, y = jnp.asarray(cos), jnp.asarray(labels)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        softmax_cross_entropy(c[0], y)
    with pytest.raises(ValueError, match="labels"):
        cosface_logits(c, y[:-1])
    with pytest.raises(TypeError, match="integer"):
        arcface_logits(c, y.astype(jnp.float32))
    with pytest.raises(TypeError, match="floating"):
        softmax_cross_entropy(jnp.ones((N, C), jnp.int32), y)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        softmax_cross_entropy(c, y.at[0].set(C))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        cosface_logits(c, y.at[0].set(-1))
    with pytest.raises(ValueError, match="reduction"):
        softmax_cross_entropy(c, y, reduction="average")
    with pytest.raises(ValueError, match="scale"):
        cosface_logits(c, y, scale=0.0)
    with pytest.raises(ValueError, match="margin"):
        cosface_logits(c, y, margin=-0.1)
    with pytest.raises(ValueError, match="pi/2"):
        arcface_logits(c, y, margin=2.0)
    with pytest.raises(TypeError, match="int"):
        sphereface_logits(c, y, margin=1.35)
    with pytest.raises(ValueError, match="margin"):
        sphereface_logits(c, y, margin=0)
    with pytest.raises(ValueError, match="lambda_"):
        sphereface_logits(c, y, lambda_=-1.0)
    with pytest.raises(ValueError, match="feature_norm"):
        sphereface_logits(c, y, feature_norm=jnp.ones((N - 1,)))
