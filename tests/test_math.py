"""Tests for kdface._math.l2_normalize, the one JAX-side L2 normalization."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close

from kdface._math import L2_NORM_EPS, l2_normalize


@pytest.mark.parametrize("axis", [-1, 0])
def test_l2_normalize_equals_numpy_loop(axis):
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    got = np.asarray(l2_normalize(jnp.asarray(x), axis=axis))
    rows = x if axis == -1 else x.T                     # the vectors being normalized
    want = np.stack([v / max(np.sqrt(sum(float(a) ** 2 for a in v)), L2_NORM_EPS)
                     for v in rows])
    # float32 vs float64 loop: a sum of len(v) squares, then rsqrt and the product (2 more
    # roundings); the entries of a unit vector are at most 1 in magnitude
    assert_close(got, want if axis == -1 else want.T, terms=rows.shape[1] + 2, scale=1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_l2_normalize_zero_row_is_zero_with_finite_gradient(dtype):
    x = jnp.zeros((2, 4), dtype).at[1].set(3.0)
    y = l2_normalize(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y[0], np.float32), 0.0)
    # exact value 3 / sqrt(4 * 9) = 0.5: 4 squares summed in float32, rsqrt, product, then the
    # cast back to `dtype` (its eps dominates); the entries are at most 1
    assert_close(np.asarray(y[1], np.float32), np.full(4, 0.5), terms=4 + 2, scale=1.0,
                 dtype=dtype)
    if dtype != jnp.float16:       # d(x/eps)/dx = 1e12 at a zero row: beyond float16's range
        grad = jax.grad(lambda v: jnp.sum(l2_normalize(v)[:, 0].astype(jnp.float32)))(x)
        assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_l2_normalize_below_eps_divides_by_eps():
    x = jnp.full((1, 4), 1e-14, jnp.float32)           # norm 2e-14 < 1e-12
    # float32 vs the float64 quotient 0.01: four roundings (1e-14 and eps**2 to float32, rsqrt,
    # the product), each relative to the result's magnitude 0.01
    assert_close(np.asarray(l2_normalize(x)), np.full((1, 4), 1e-14 / L2_NORM_EPS), terms=4,
                 scale=1e-14 / L2_NORM_EPS)
