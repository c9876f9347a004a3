"""PWR teacher ties (Nikitin et al. 2020 eq. 3): the tie tolerance in every method, and pairs
counted in the inputs' dtype by the sharded loss.

A teacher with integer-valued embeddings has many mathematically equal cosines; computed in
float32 they differ by rounding, and a strict ``>`` orders them. ``tie_tolerance`` merges them:
the count of ordered pairs must then equal the exact one (rational arithmetic), and every method
must count the same pairs as a NumPy loop over the same float32 scores.

Float comparisons follow the one tolerance rule (tests/_tolerance.py): the float32 losses against
the float64 reference of test_losses_pwr.py (the teacher order decided in float32, as in the
loss), eps32 x reduction length x the float64 magnitude of each element's terms.
"""
from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from _tolerance import assert_close
from test_losses_pwr import ref_embeddings_terms64, ref_pair_terms64
from kdface.losses import _pwr, _pwr_common, _pwr_sorted, _pwr_tiled, pwr_loss, pwr_loss_sharded
from kdface.losses._pwr_common import Inversion

DATA = PartitionSpec("data")
N = 12
TOL = 1e-6


def _integer_teacher() -> np.ndarray:
    t = np.random.default_rng(1).integers(-2, 3, size=(N, 4)).astype(np.float32)
    assert (np.abs(t).sum(1) > 0).all()
    return t


def _student() -> np.ndarray:
    return np.random.default_rng(2).normal(size=(N, 6)).astype(np.float32)


def _exact_cosines(t: np.ndarray) -> list[Fraction]:
    """Signed squared cosines of pairs i < j (row-major), exact: same order as the cosines."""
    i, j = np.triu_indices(len(t), 1)
    out = []
    for a, b in zip(i, j):
        dot, na, nb = (int(t[a] @ t[b]), int(t[a] @ t[a]), int(t[b] @ t[b]))
        out.append((1 if dot >= 0 else -1) * Fraction(dot * dot, na * nb))
    return out


def _loop_loss(s: np.ndarray, t: np.ndarray, inversion: str, beta: float, margin: str,
               tol: float) -> float:
    """Literal loop over score pairs (a, b): ordered iff t_b < t_a - tol in float32."""
    total, count = 0.0, 0
    for a in range(len(t)):
        threshold = np.float32(t[a] - np.float32(tol))
        for b in range(len(t)):
            if not t[b] < threshold:
                continue
            count += 1
            z = float(s[b]) - float(s[a])
            if margin == "teacher_diff":
                z += float(t[a]) - float(t[b])
            if inversion == "exp":
                total += max(np.expm1(beta * z), 0.0)
            elif inversion == "diff":
                total += max(z, 0.0)
            else:
                total += np.logaddexp(0.0, beta * z)
    return total / count


def test_tolerance_counts_the_mathematical_ties():
    t = _integer_teacher()
    exact = _exact_cosines(t)
    want = sum(1 for a in exact for b in exact if b < a)
    scores = _pwr.pairwise_scores(jnp.asarray(t))
    assert len(set(np.asarray(scores).tolist())) > len(set(exact))   # rounding split ties
    strict = float(_pwr_common.ordered_pair_count(scores))
    assert strict > want                                            # ... and ordered them
    assert float(_pwr_common.ordered_pair_count(scores, TOL)) == want


VARIANTS = [("exp", 1.0, "teacher_diff"), ("diff", 1.0, "none"), ("ranknet", 2.0, "none")]


@pytest.mark.parametrize("inversion,beta,margin", VARIANTS)
def test_every_method_equals_loop_with_tied_teacher(inversion, beta, margin):
    """Whole losses (scores computed inside each jitted call, where rounding may differ from
    the loop's scores): with the tolerance every tie is merged whatever its rounding."""
    tol = TOL
    s, t = jnp.asarray(_student()), jnp.asarray(_integer_teacher())
    ss, ts = (np.asarray(_pwr.pairwise_scores(e)) for e in (s, t))
    want = _loop_loss(ss, ts, inversion, beta, margin, tol)
    kw = dict(inversion=inversion, beta=beta, margin=margin, tie_tolerance=tol)
    methods = ["dense", "tiled"] + (["sorted"] if inversion != "ranknet" else [])
    value0, grad0 = jax.jit(jax.value_and_grad(
        lambda a: pwr_loss(a, t, method="dense", **kw)))(s)
    v64, v_scale, g64, g_scale, count = ref_embeddings_terms64(
        np.asarray(s), np.asarray(t), inversion=inversion, beta=beta, margin=margin,
        tie_tolerance=tol)
    n, d = s.shape
    # The loop sums in float64 over the float32 scores (each a sum of D products, normalized):
    # the same pairs, and only the scores' float32 rounding in the difference (v_scale holds
    # the first-order effect of rounding a pair's inputs).
    assert_close(want, v64, terms=2 * d, scale=v_scale, what="loop: ")
    m = n * (n - 1) // 2
    for method in methods:
        value, grad = jax.jit(jax.value_and_grad(lambda a, m=method: pwr_loss(a, t, method=m,
                                                                             **kw)))(s)
        # Mean of `count` pair terms of scores that are sums of D products; gradient (i, c):
        # a score's <= M - 1 pairs, the N - 1 scores of row i, the normalization's D.
        assert_close(float(value), v64, terms=count + 2 * d, scale=v_scale,
                     what=f"{method} value: ")
        assert_close(np.asarray(grad), g64, terms=m + n + d, scale=g_scale,
                     what=f"{method} grad: ")

@pytest.mark.parametrize("tol", [0.0, TOL, 0.3])
def test_pair_sums_with_small_tiles_and_levels(tol):
    """The methods' cores on tied-by-rounding teacher scores: tiles of 8 (off-diagonal tiles
    and padding) and the sorted sweep's levels count exactly the dense pairs."""
    t = _pwr.pairwise_scores(jnp.asarray(_integer_teacher()))
    s = _pwr.pairwise_scores(jnp.asarray(_student()))
    x, y = _pwr.pair_values(s, t, "teacher_diff", 0.0)
    inv = Inversion("exp", 1.0, 1.0)
    bound = _pwr_common.value_range_bound("cosine", "teacher_diff", 0.0)
    dense_sum, dense_count = _pwr.dense_pair_sum(t, x, y, inv, tol)
    want = _loop_loss(np.asarray(s), np.asarray(t), "exp", 1.0, "teacher_diff", tol)
    v64, v_scale, _, _, count = ref_pair_terms64(np.asarray(x), np.asarray(y), np.asarray(t),
                                                 inversion="exp", tie_tolerance=tol)
    # Both sum in float64; the loop forms the margin s - t in float64, x and y were formed in
    # float32 (one rounding each): float32's rule over those 2 operations.
    assert_close(want, v64, terms=2, scale=v_scale, what="loop: ")
    tiled_sum, tiled_count = _pwr_tiled.tiled_pair_sum(t, x, y, inv, bound, block=8,
                                                       tie_tolerance=tol)
    sorted_sum, sorted_count = _pwr_sorted.sorted_pair_sum(t, x, y, inv, tie_tolerance=tol)
    assert float(tiled_count) == float(sorted_count) == float(dense_count) == count
    # Sums (not means) of `count` pair terms: scale the mean's magnitude by the count.
    for what, got in (("dense", dense_sum), ("tiled", tiled_sum), ("sorted", sorted_sum)):
        assert_close(float(got), v64 * count, terms=max(count, 1), scale=v_scale * count,
                     what=f"{what} sum: ")

def test_bad_tie_tolerance():
    s, t = jnp.asarray(_student()), jnp.asarray(_integer_teacher())
    with pytest.raises(ValueError, match="tie_tolerance"):
        pwr_loss(s, t, tie_tolerance=-1e-6)
    with pytest.raises(ValueError, match="tie_tolerance"):
        pwr_loss(s, t, tie_tolerance=float("nan"))
    with pytest.raises(TypeError, match="tie_tolerance"):
        pwr_loss(s, t, tie_tolerance=jnp.float32(1e-6))


# -------------------------------------------------------------------------------- sharded

@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) >= 4, "tests/conftest.py provides 4 CPU devices"
    return jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("method", ["dense", "tiled", "sorted"])
def test_sharded_tolerance_equals_single_device(mesh, method):
    s, t = jnp.asarray(_student()), jnp.asarray(_integer_teacher())
    kw = dict(method=method, tie_tolerance=TOL)
    sharded = jax.shard_map(lambda a, b: pwr_loss_sharded(a, b, **kw), mesh=mesh,
                            in_specs=(DATA, DATA), out_specs=PartitionSpec())
    value, grad = jax.jit(jax.value_and_grad(sharded))(s, t)
    value0, grad0 = jax.jit(jax.value_and_grad(lambda a: pwr_loss(a, t, **kw)))(s)
    v64, v_scale, g64, g_scale, count = ref_embeddings_terms64(np.asarray(s), np.asarray(t),
                                                                tie_tolerance=TOL)
    n, d = s.shape
    m = n * (n - 1) // 2
    for what, v, g in (("sharded", value, grad), ("single", value0, grad0)):
        # As above, + the psum over the 4 devices in each reduction.
        assert_close(float(v), v64, terms=count + 2 * d + 4, scale=v_scale, what=f"{what} value: ")
        assert_close(np.asarray(g), g64, terms=m + n + d + 4, scale=g_scale, what=f"{what} grad: ")

@pytest.mark.parametrize("method", ["dense", "tiled", "sorted"])
def test_sharded_float64_counts_in_float64(mesh, method):
    """Teacher scores distinct in float64 but equal once cast to float32: the sharded count must
    see them as ordered, as its float64 sums and the single-device loss do."""
    rng = np.random.default_rng(3)
    t = rng.normal(size=(N, 5))
    t[1] = t[0] + 1e-11 * rng.normal(size=5)   # cos(t_1, t_k) = cos(t_0, t_k) + O(1e-11)
    s = rng.normal(size=(N, 5))
    with jax.enable_x64(True):
        s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
        scores = _pwr.pairwise_scores(t64)
        distinct64 = len(np.unique(np.asarray(scores)))
        assert len(np.unique(np.asarray(scores).astype(np.float32))) < distinct64
        sharded = jax.shard_map(lambda a, b: pwr_loss_sharded(a, b, method=method), mesh=mesh,
                                in_specs=(DATA, DATA), out_specs=PartitionSpec())
        got = jax.jit(sharded)(s64, t64)
        want = pwr_loss(s64, t64, method=method)
        assert got.dtype == jnp.float64
        # float64 vs float64 of another summation order (sharded vs single): the rule in float64,
        # the mean of the ordered pairs (<= M^2) of scores that are sums of D products.
        m = N * (N - 1) // 2
        assert_close(float(got), float(want), terms=2 * (m * m + 2 * 5 + 4),
                     scale=abs(float(want)), dtype=np.float64, what=f"{method} float64: ")
