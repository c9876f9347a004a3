"""MK-MMD (Wang et al. 2019 eq. (8)) against float64 NumPy loops over the kernel sums."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close

from kdface.losses import _mmd
from kdface.losses._mmd import mk_mmd

MULTS = (1, 2, 4, 8, 16)


def ref_sigma2(x, y):
    """Mean squared distance over the distinct (unordered) pairs of the pooled sample."""
    z = np.concatenate([x, y])
    pairs = [(a, b) for a in range(len(z)) for b in range(a + 1, len(z))]
    return np.mean([np.sum((z[a] - z[b]) ** 2) for a, b in pairs])


def ref_kernel(a, b, sigma2, mults):
    """(1/K) sum_m exp(-|a - b|^2 / (2 sigma^2 m)): Wang et al. 2019 §2.3, equal weights."""
    d2 = np.sum((a - b) ** 2)
    return np.mean([np.exp(-d2 / (2.0 * sigma2 * m)) for m in mults])


def _normalized(x, y, normalize):
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
    return x, y


def ref_mmd(x, y, mults=MULTS, normalize=True, estimator="biased", sigma2=None):
    x, y = _normalized(x, y, normalize)
    if sigma2 is None:
        sigma2 = ref_sigma2(x, y)
    n, m = len(x), len(y)
    if estimator == "linear":
        h = []
        for i in range(n // 2):
            x0, x1, y0, y1 = x[2 * i], x[2 * i + 1], y[2 * i], y[2 * i + 1]
            h.append(ref_kernel(x0, x1, sigma2, mults) + ref_kernel(y0, y1, sigma2, mults)
                     - ref_kernel(x0, y1, sigma2, mults) - ref_kernel(x1, y0, sigma2, mults))
        return np.mean(h)
    skip_diag = estimator == "unbiased"
    kxx = [ref_kernel(x[i], x[j], sigma2, mults)
           for i in range(n) for j in range(n) if not (skip_diag and i == j)]
    kyy = [ref_kernel(y[i], y[j], sigma2, mults)
           for i in range(m) for j in range(m) if not (skip_diag and i == j)]
    kxy = [ref_kernel(x[i], y[j], sigma2, mults) for i in range(n) for j in range(m)]
    return np.mean(kxx) + np.mean(kyy) - 2.0 * np.mean(kxy)


def _data(n, m, d=6, seed=0, shift=0.7):
    """float64 arrays holding float32 values: the references see the inputs kdface sees."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(m, d)) + shift
    return x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)


def _terms_scale(x, y, mults=MULTS, normalize=True):
    """(terms, scale) of the tolerance rule for a float32 MMD^2 against the float64 loop.

    Each kernel mean sums up to max(N, M)^2 kernel values of one GEMM-derived squared distance
    (D products): max(N, M)^2 + D terms. MMD^2 is the difference k_xx + k_yy - 2 k_xy of means
    of kernels in [0, 1], so the scale is the magnitude of those terms (k_xx + k_yy + 2 k_xy),
    times 1 + the largest kernel exponent (|a|^2 + |b|^2) / (2 sigma^2 m): the relative error
    of d^2 = |a|^2 + |b|^2 - 2 a.b is measured against |a|^2 + |b|^2 and the exponential
    multiplies it by the exponent.
    """
    x, y = _normalized(x, y, normalize)
    sigma2 = ref_sigma2(x, y)
    k = lambda a, b: np.mean([ref_kernel(u, v, sigma2, mults) for u in a for v in b])  # noqa
    sq = np.concatenate([np.sum(x * x, 1), np.sum(y * y, 1)])
    exponent = 2 * sq.max() / (2 * sigma2 * min(mults))
    terms = max(len(x), len(y)) ** 2 + x.shape[1]
    return terms, (k(x, x) + k(y, y) + 2 * k(x, y)) * (1 + exponent)


def jitted(**options):
    return jax.jit(functools.partial(mk_mmd, **options))


def _f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def test_bandwidth_is_mean_over_distinct_pooled_pairs():
    x, y = _data(5, 7)
    got = jax.jit(_mmd.pooled_mean_sq_distance)(*_f32(x, y))
    # float32 vs float64: a sum of P * D = 72 positive squares of centred entries (after the
    # P-term mean): 72 + 12 terms, scale = the value (positive terms)
    want = ref_sigma2(x, y)
    assert_close(got, want, terms=12 * 6 + 12, scale=want)
    # The choice matters: counting the zero self-pairs (P^2) would give a smaller value.
    # Not a rounding tolerance: the two definitions differ by want / P ~ 0.9, far above 1e-2.
    p = 12
    assert abs(ref_sigma2(x, y) * (p - 1) / p - float(got)) > 1e-2


@pytest.mark.parametrize("n,m,normalize", [(6, 6, True), (5, 9, True), (8, 4, False)])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_quadratic_estimators_match_loop(n, m, normalize, estimator):
    x, y = _data(n, m, seed=n + m)
    got = jitted(normalize=normalize, estimator=estimator)(*_f32(x, y))
    want = ref_mmd(x, y, normalize=normalize, estimator=estimator)
    terms, scale = _terms_scale(x, y, normalize=normalize)   # float32 vs float64, see there
    assert_close(got, want, terms=terms, scale=scale)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_estimator_matches_loop(normalize):
    x, y = _data(10, 10)
    got = jitted(normalize=normalize, estimator="linear")(*_f32(x, y))
    want = ref_mmd(x, y, normalize=normalize, estimator="linear")
    terms, scale = _terms_scale(x, y, normalize=normalize)   # float32 vs float64, see there
    assert_close(got, want, terms=terms, scale=scale)


@pytest.mark.parametrize("mults", [(1,), (0.5, 3.0), (1, 2, 4, 8, 16, 32)])
def test_other_multipliers(mults):
    x, y = _data(6, 5)
    got = jitted(multipliers=mults)(*_f32(x, y))
    terms, scale = _terms_scale(x, y, mults=mults)   # float32 vs float64, see there
    assert_close(got, ref_mmd(x, y, mults=mults), terms=terms, scale=scale)


def test_zero_for_identical_samples_and_positive_otherwise():
    x64, y64 = _data(8, 8)
    x, y = _f32(x64, y64)
    # exact answer 0 (the kernel means cancel); the float32 sums that should cancel carry the
    # bound of _terms_scale with x for y
    terms, scale = _terms_scale(x64, x64)
    assert_close(float(jitted()(x, x)), 0.0, terms=terms, scale=scale)
    assert_close(float(jitted(estimator="linear")(x, x)), 0.0, terms=terms, scale=scale)
    # Not a rounding tolerance: a sanity floor, shifted samples give MMD^2 ~ 0.1 here.
    assert float(jitted()(x, y)) > 1e-3


def test_gradient_matches_numpy_with_fixed_bandwidth():
    """The bandwidth is under stop_gradient: the gradient is the one at fixed sigma^2."""
    x, y = _data(5, 4, d=3)
    sigma2 = ref_sigma2(*_normalized(x, y, True))
    want = np.zeros_like(x)
    h = 1e-6
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        want[idx] = (ref_mmd(xp, y, sigma2=sigma2) - ref_mmd(xm, y, sigma2=sigma2)) / (2 * h)
    got = jax.jit(jax.grad(mk_mmd))(*_f32(x, y))
    # float32 vs float64 central differences (h = 1e-6: truncation ~h^2, rounding ~1e-10, far
    # below float32's). Each gradient row sums the kernel derivatives against the other N + M
    # rows, each from a D-term distance, and goes through the normalization's D-term norm:
    # N + M + 2D terms; scale: the MMD's scale of _terms_scale times the kernel coefficient
    # 1 / (2 sigma^2) (the chain rule's factor on each kernel derivative), at least max|grad|.
    terms, scale = _terms_scale(x, y)
    sigma2 = ref_sigma2(*_normalized(x, y, True))
    assert_close(got, want, terms=5 + 4 + 2 * 3,
                 scale=max(scale / (2 * sigma2 * min(MULTS)), np.abs(want).max()))


def test_jit_equals_eager():
    # MMD^2 is a difference of O(1) kernel means: fusion changes rounding at the 1e-7 level.
    x, y = _f32(*_data(6, 4))
    terms, scale = _terms_scale(*_data(6, 4))
    for estimator in ("biased", "unbiased"):
        # float32 vs float32 in another order (fused vs op by op): both err, 2 x the terms
        assert_close(jitted(estimator=estimator)(x, y), mk_mmd(x, y, estimator=estimator),
                     terms=2 * terms, scale=scale)


def test_bfloat16_inputs_compute_in_float32():
    x, y = _data(6, 6)
    x16, y16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    got = jitted()(x16, y16)
    assert got.dtype == jnp.float32
    want = jitted()(x16.astype(jnp.float32), y16.astype(jnp.float32))
    # float32 vs float32 of another compiled program (the bf16 -> f32 convert fused in):
    # both err, 2 x the terms of _terms_scale on the bf16-rounded inputs
    terms, scale = _terms_scale(np.asarray(x16, np.float64), np.asarray(y16, np.float64))
    assert_close(got, want, terms=2 * terms, scale=scale)
    assert jax.jit(jax.grad(mk_mmd))(x16, y16).dtype == jnp.bfloat16


def test_kernels_fused_without_stacks():
    """No [K, N, M] kernel stack and no [N, M, D] difference broadcast in the compiled HLO."""
    n, d, k = 32, 24, 5
    x, y = _f32(*_data(n, n, d=d))
    text = jax.jit(jax.value_and_grad(mk_mmd)).lower(x, y).compile().as_text()
    sizes = [int(np.prod([int(v) for v in dims.split(",")]))
             for dims in re.findall(r"[fsu]\d+\[(\d+(?:,\d+)*)\]", text)]
    assert max(sizes) < min(k * n * n, n * n * d), max(sizes)


def test_bad_inputs():
    x, y = _f32(*_data(6, 6))
    with pytest.raises(ValueError, match="estimator"):
        mk_mmd(x, y, estimator="quadratic")
    with pytest.raises(ValueError, match="rank 2"):
        mk_mmd(x[0], y)
    with pytest.raises(TypeError, match="floating"):
        mk_mmd(x.astype(jnp.int32), y)
    with pytest.raises(ValueError, match="feature size D"):
        mk_mmd(x, y[:, :4])
    with pytest.raises(ValueError, match="N == M and N even"):
        mk_mmd(x[:5], y[:5], estimator="linear")
    with pytest.raises(ValueError, match="N == M and N even"):
        mk_mmd(x, y[:4], estimator="linear")
    with pytest.raises(ValueError, match="N >= 2"):
        mk_mmd(x[:1], y, estimator="unbiased")
    with pytest.raises(ValueError, match="positive"):
        mk_mmd(x, y, multipliers=(1, -2))
    with pytest.raises(ValueError, match="positive"):
        mk_mmd(x, y, multipliers=())
    with pytest.raises(TypeError, match="sequence"):
        mk_mmd(x, y, multipliers=4)
