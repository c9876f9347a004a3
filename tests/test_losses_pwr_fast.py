"""PWR fast methods (Nikitin et al. 2020 eq. 3): tiled and sorted equal dense, value and gradient.

The dense method is checked against a literal NumPy loop in test_losses_pwr.py; here every fast
method and the dense one are compared with the float64 reference of that file (tests/_tolerance.py:
eps32 x reduction length x the float64 magnitude of each element's terms) on random and tied
inputs, for every inversion and every margin (pair level, batched with vmap so each variant
compiles once) and both relations (embedding level).
"""
from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from _tolerance import assert_close
from test_losses_pwr import ref_embeddings_terms64, ref_pair_terms64
from kdface.losses import _pwr, _pwr_common, _pwr_sorted, _pwr_tiled, pwr_loss
from kdface.losses._pwr_common import Inversion

M = 300  # scores: above one 256-tile so the tiled sweep has off-diagonal tiles and padding
MARGINS = [("none", 0.0), ("const", 0.1), ("teacher_std", 0.0), ("teacher_diff", 0.0)]
VARIANTS = [("diff", 1.0, 1.0), ("power", 2.0, 1.0), ("power", 0.5, 1.0), ("exp", 1.0, 1.0),
            ("exp", 1.0, 3.0), ("exp", 1.0, 20.0), ("ranknet", 1.0, 2.0)]


def _scores(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(student, teacher) scores in [-1, 1] with the given tie structure."""
    def grid(levels):  # values k / 8: many exact ties
        return rng.integers(-levels, levels + 1, M).astype(np.float32) / 8

    def smooth():
        return rng.uniform(-1, 1, M).astype(np.float32)
    s, t = {"random": (smooth(), smooth()), "teacher_ties": (smooth(), grid(3)),
            "student_ties": (grid(4), smooth()), "both_ties": (grid(8), grid(2))}[kind]
    return s, t


def _problems() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stacked ``(t, x, y)`` for every margin x tie structure, plus student == teacher."""
    rng = np.random.default_rng(0)
    ts, xs, ys = [], [], []
    for kind in ("random", "teacher_ties", "student_ties", "both_ties", "equal"):
        s, t = _scores("random" if kind == "equal" else kind, rng)
        if kind == "equal":
            s = t.copy()
        for margin, value in MARGINS:
            x, y = _pwr.pair_values(jnp.asarray(s), jnp.asarray(t), margin, value)
            ts.append(t), xs.append(np.asarray(x)), ys.append(np.asarray(y))
    return np.stack(ts), np.stack(xs), np.stack(ys)


def _mean_fn(method: str, inversion: Inversion):
    bound = _pwr_common.value_range_bound("cosine", "teacher_diff", 0.0)

    def mean(x, y, t):
        total, count = _pwr.pwr_pair_sum(t, x, y, inversion, method, bound)
        return total / count
    return jax.jit(jax.vmap(jax.value_and_grad(mean, argnums=(0, 1))))


def _assert_matches_float64(got, problems, inversion: Inversion, what: str):
    """Value and dS/dx, dS/dy of every stacked problem against ``ref_pair_terms64``."""
    v, (gx, gy) = got
    for k, (t, x, y) in enumerate(zip(*(np.asarray(a) for a in problems))):
        v64, v_scale, (gx64, sx), (gy64, sy), count = ref_pair_terms64(
            x, y, t, inversion=inversion.kind, power=inversion.power, beta=inversion.beta)
        # The mean of `count` pair terms (<= M^2); scale: their float64 magnitude with the
        # first-order effect of rounding their inputs (test_losses_pwr.ref_pair_terms64).
        assert_close(float(v[k]), v64, terms=max(count, 1), scale=v_scale,
                     what=f"{what} problem {k} value: ")
        # Each dS/dx_b (dS/dy_a) sums the slopes of the <= M - 1 ordered pairs score b (a) is
        # in; per-element scale: the float64 sum of their |l'(z)| / count.
        assert_close(np.asarray(gx[k]), gx64, terms=M, scale=sx, what=f"{what} {k} dx: ")
        assert_close(np.asarray(gy[k]), gy64, terms=M, scale=sy, what=f"{what} {k} dy: ")


@pytest.fixture(scope="module")
def problems():
    return tuple(jnp.asarray(a) for a in _problems())


def _fast_cases():
    bound = _pwr_common.value_range_bound("cosine", "teacher_diff", 0.0)
    cases = [("tiled",) + v for v in VARIANTS]
    cases += [("sorted",) + v for v in VARIANTS
              if _pwr_common.sorted_supports(Inversion(*v), bound)]
    return cases


@pytest.mark.parametrize("method,kind,power,beta", _fast_cases())
def test_fast_equals_dense_every_margin_and_tie_pattern(problems, method, kind, power, beta):
    t, x, y = problems
    inversion = Inversion(kind, power, beta)
    got = _mean_fn(method, inversion)(x, y, t)
    _assert_matches_float64(got, problems, inversion, f"{method} {kind} {power} {beta}")
    if kind != "ranknet":  # student == teacher, margin none / teacher_diff: exactly 0
        equal = 4 * len(MARGINS)
        assert np.all(np.asarray(got[0])[[equal, equal + 3]] == 0.0)


def test_sorted_covers_the_separable_variants():
    bound = _pwr_common.value_range_bound("cosine", "teacher_diff", 0.0)
    covered = {tuple(v) for m, *v in _fast_cases() if m == "sorted"}
    assert covered == {("diff", 1.0, 1.0), ("power", 2.0, 1.0), ("exp", 1.0, 1.0),
                       ("exp", 1.0, 3.0)}
    assert not _pwr_common.sorted_supports(Inversion("exp", 1.0, 20.0), bound)
    assert not _pwr_common.sorted_supports(Inversion("power", 3.0), bound)


def test_tiled_exp_falls_back_when_scores_exceed_the_factor_bound():
    # Scores far wider than [-1, 1]: beta * range > 60, the run-time check must pick per-pair exp.
    rng = np.random.default_rng(1)
    t = jnp.asarray(rng.normal(size=200).astype(np.float32))
    x = jnp.asarray(rng.uniform(-30, 30, 200).astype(np.float32))
    inversion = Inversion("exp", 1.0, 1.0)
    got = _pwr_tiled.tiled_pair_sum(t, x, x, inversion, 4.0, block=64)[0]
    want = _pwr.dense_pair_sum(t, x, x, inversion)[0]
    v64, v_scale, _, _, count = ref_pair_terms64(x, x, t, inversion="exp")
    # Sums (not means) of `count` pair terms; scale: their float64 magnitude with the effect of
    # rounding their inputs, times count (ref_pair_terms64 returns means).
    for what, value in (("tiled ", got), ("dense ", want)):
        assert_close(float(value), v64 * count, terms=count, scale=v_scale * count, what=what)


# --------------------------------------------------------------------------- embedding level

def _embeddings(n: int, seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, 8)).astype(np.float32)
    t = rng.normal(size=(n, 16)).astype(np.float32)
    if ties:  # duplicate teacher rows tie teacher scores; duplicate student rows tie students
        t[1], t[2] = t[0], t[0]
        s[5] = s[4]
    return jnp.asarray(s), jnp.asarray(t)


@pytest.mark.parametrize("method,relation,inversion,margin,margin_value", [
    ("sorted", "cosine", "exp", "teacher_diff", 0.0),
    ("sorted", "euclidean", "diff", "const", 0.1),
    ("tiled", "cosine", "ranknet", "teacher_std", 0.0),
    ("tiled", "euclidean", "power", "none", 0.0)])
def test_embeddings_equal_dense(method, relation, inversion, margin, margin_value):
    """Both relations, through the scores' chain rule; duplicate rows give teacher and student
    ties."""
    kw = dict(relation=relation, inversion=inversion, margin=margin, margin_value=margin_value,
              power=2.0, beta=2.0)
    fns = {m: jax.jit(jax.value_and_grad(lambda a, b, m=m: pwr_loss(a, b, method=m, **kw)))
           for m in (method, "dense")}
    n, d, m = 24, 8, 24 * 23 // 2
    for seed, ties in ((0, False), (1, True)):
        s, t = _embeddings(n, seed, ties)
        v64, v_scale, g64, g_scale, count = ref_embeddings_terms64(np.asarray(s), np.asarray(t),
                                                                    **kw)
        for name, fn in fns.items():
            v, g = fn(s, t)
            # Value: the mean of `count` pair terms of scores that are sums of D products.
            assert_close(float(v), v64, terms=count + 2 * d, scale=v_scale,
                         what=f"{name} ties={ties} value: ")
            # Gradient element (i, c): nested sums, a score's slopes over its <= M - 1 ordered
            # pairs, then the N - 1 scores of row i, then the normalization's D; per-element
            # scale: the float64 sum of the |terms| (for euclidean also the rounding of
            # d psi / d e at near-duplicate rows, see ref_embeddings_terms64).
            assert_close(np.asarray(g), g64, terms=m + n + d, scale=g_scale,
                         what=f"{name} ties={ties} grad: ")


# ------------------------------------------------------------------------------ known answers

def test_sorted_exp_beyond_the_factor_bound_is_nan_not_wrong():
    rng = np.random.default_rng(2)
    t = jnp.asarray(rng.normal(size=100).astype(np.float32))
    x = jnp.asarray(rng.uniform(-40, 40, 100).astype(np.float32))
    total, _ = jax.jit(lambda a, b: _pwr_sorted.sorted_pair_sum(a, b, b, Inversion("exp")))(t, x)
    assert np.isnan(float(total))


def test_medium_batch_sorted_equals_tiled():
    """N=128 (M=8128, 3 levels of tiles, 15 sorted levels): value and gradient agree."""
    n, d = 128, 8
    s, t = _embeddings(n, 5, True)
    v64, v_scale, g64, g_scale, count = ref_embeddings_terms64(np.asarray(s), np.asarray(t))
    for method in ("tiled", "sorted"):
        v, g = jax.jit(jax.value_and_grad(lambda a, b: pwr_loss(a, b, method=method)))(s, t)
        # As in test_embeddings_equal_dense: the value a mean of `count` pair terms, a gradient
        # element nested sums over a score's <= M - 1 pairs, the row's N - 1 scores, D.
        assert_close(float(v), v64, terms=count + 2 * d, scale=v_scale, what=method + " value: ")
        assert_close(np.asarray(g), g64, terms=n * (n - 1) // 2 + n + d, scale=g_scale,
                     what=method + " grad: ")


# ------------------------------------------------------------------------------- the pieces

def test_radix_argsort_is_a_stable_float_argsort():
    rng = np.random.default_rng(6)
    v = rng.normal(size=5000).astype(np.float32)
    v[::7] = 0.25
    v[1::11] = -0.0
    v[2::13] = 0.0
    v[3::17] = -3e38
    got = _pwr_sorted.radix_argsort(_pwr_sorted.unsigned_key(jnp.asarray(v)))
    np.testing.assert_array_equal(np.asarray(got), np.argsort(v + 0.0, kind="stable"))
    bit = rng.integers(0, 2, 5000).astype(np.int32)
    got = _pwr_sorted.radix_argsort(_pwr_sorted.unsigned_key(jnp.asarray(v)), jnp.asarray(bit))
    np.testing.assert_array_equal(np.asarray(got), np.lexsort((bit, v + 0.0)))


def test_event_order_shared_values_matches_general():
    x = jnp.asarray(np.random.default_rng(7).integers(0, 5, 300).astype(np.float32))
    general, shared = jax.jit(lambda v: (_pwr_sorted.event_order(v, v),
                                         _pwr_sorted.event_order(v)))(x)
    values = np.concatenate([np.asarray(x)] * 2)
    kinds = np.repeat([0, 1], 300)
    np.testing.assert_array_equal(values[np.asarray(general)], values[np.asarray(shared)])
    np.testing.assert_array_equal(kinds[np.asarray(general)], kinds[np.asarray(shared)])


def test_block_scan_matches_cumsum():
    v = np.random.default_rng(8).normal(size=(2, 1 << 13)).astype(np.float32)
    scan = jax.jit(_pwr_sorted.block_scan, static_argnames="reverse")
    for log_block in (0, 3, 6, 9, 13):
        blocks = v.astype(np.float64).reshape(2, -1, 1 << log_block)
        prefix = np.cumsum(blocks, axis=2) - blocks
        suffix = np.cumsum(blocks[:, :, ::-1], axis=2)[:, :, ::-1] - blocks
        # block_scan forms the exclusive sum as (inclusive sum) - v: each output's terms are
        # the block's inputs up to and including its own, their float64 |v| sum its scale.
        mags = np.abs(blocks)
        prefix_mag = np.cumsum(mags, axis=2)
        suffix_mag = np.cumsum(mags[:, :, ::-1], axis=2)[:, :, ::-1]
        for got, want, mag in ((scan(jnp.asarray(v), log_block), prefix, prefix_mag),
                               (scan(jnp.asarray(v), log_block, reverse=True), suffix,
                                suffix_mag)):
            # Up to 2^log_block inputs summed, then one subtraction.
            assert_close(np.asarray(got), want.reshape(2, -1), terms=(1 << log_block) + 1,
                         scale=mag.reshape(2, -1), what=f"log_block={log_block} ")


# ------------------------------------------------------------------ auto, jit, dtypes, memory

def test_auto_picks_an_exact_method():
    bound = _pwr_common.value_range_bound("cosine", "teacher_diff", 0.0)
    small, mid, big = _pwr.AUTO_DENSE_MAX_M, _pwr.AUTO_TILED_MAX_M, _pwr.AUTO_TILED_MAX_M + 1
    assert _pwr.resolve_method("auto", small, Inversion("exp"), bound) == "dense"
    assert _pwr.resolve_method("auto", mid, Inversion("exp"), bound) == "tiled"
    assert _pwr.resolve_method("auto", big, Inversion("exp"), bound) == "sorted"
    assert _pwr.resolve_method("auto", big, Inversion("diff"), bound) == "sorted"
    assert _pwr.resolve_method("auto", big, Inversion("power", 2.0), bound) == "sorted"
    assert _pwr.resolve_method("auto", big, Inversion("ranknet"), bound) == "tiled"
    assert _pwr.resolve_method("auto", big, Inversion("power", 0.5), bound) == "tiled"
    assert _pwr.resolve_method("auto", big, Inversion("exp", 1.0, 50.0), bound) == "tiled"
    huge = _pwr_sorted.SORTED_MAX_M + 1   # beyond exact float32 partition counts
    assert _pwr.resolve_method("auto", huge, Inversion("exp"), bound) == "tiled"
    with pytest.raises(ValueError, match="up to M="):
        _pwr.resolve_method("sorted", huge, Inversion("exp"), bound)
    s, t = _embeddings(72, 9, False)   # M = 2556: sorted
    v64, v_scale, _, _, count = ref_embeddings_terms64(np.asarray(s), np.asarray(t))
    for m in ("auto", "dense"):
        # The mean of `count` pair terms of scores that are sums of D = 8 products.
        assert_close(float(jax.jit(lambda a, b, m=m: pwr_loss(a, b, method=m))(s, t)), v64,
                     terms=count + 2 * 8, scale=v_scale, what=m + " ")


@pytest.mark.parametrize("method,inversion,margin", [
    ("tiled", "ranknet", "none"), ("sorted", "power", "teacher_std")])
def test_fast_gradients_finite_differences_float64(method, inversion, margin):
    with jax.enable_x64(True):
        rng = np.random.default_rng(12)
        s, t = jnp.asarray(rng.normal(size=(10, 4))), jnp.asarray(rng.normal(size=(10, 5)))
        t = t.at[1].set(t[0])
        f = jax.jit(lambda a: pwr_loss(a, t, method=method, inversion=inversion, margin=margin,
                                       margin_value=0.1 if margin == "const" else 0.0,
                                       power=2.0))
        assert f(s).dtype == jnp.float64
        # Not the float32 rule: float64 central differences with step 1e-6 (truncation
        # ~1e-12 x the third derivative, rounding ~1e-10), within check_grads' own tolerances.
        check_grads(f, (s,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["tiled", "sorted"])
def test_jit_equals_eager_and_bfloat16_compiles(method):
    s, t = _embeddings(8, 10, True)
    eager = pwr_loss(s, t, method=method)
    jitted = jax.jit(lambda a, b: pwr_loss(a, b, method=method))(s, t)
    v64, v_scale, _, _, count = ref_embeddings_terms64(np.asarray(s), np.asarray(t))
    for what, value in (("eager ", eager), ("jit ", jitted)):
        # The mean of `count` pair terms of scores that are sums of D = 8 products.
        assert_close(float(value), v64, terms=count + 2 * 8, scale=v_scale, what=what)
    if method == "sorted":  # the dtype handling is shared by all methods
        g = jax.jit(jax.grad(lambda a, b: pwr_loss(a, b, method=method)))(
            s.astype(jnp.bfloat16), t.astype(jnp.bfloat16))
        assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def _largest_intermediate(jaxpr) -> int:
    """Most elements of any value in a jaxpr, sub-jaxprs (scan, cond, custom_vjp) included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in list(eqn.invars) + list(eqn.outvars):
            shape = getattr(getattr(var, "aval", None), "shape", ())
            biggest = max(biggest, int(np.prod(shape)) if shape else 1)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            biggest = max(biggest, _largest_intermediate(sub))
    return biggest


@pytest.mark.parametrize("method,inversion", [("tiled", "exp"), ("tiled", "ranknet"),
                                              ("sorted", "exp"), ("sorted", "diff"),
                                              ("dense", "exp")])
def test_no_m_squared_intermediate(method, inversion):
    """N=64, M=2016: neither pass of tiled/sorted holds anything with >= M^2 elements (the dense
    method does, which shows the check can fail)."""
    s, t = _embeddings(64, 11, False)
    m = 64 * 63 // 2
    jaxpr = jax.make_jaxpr(jax.value_and_grad(
        lambda a: pwr_loss(a, t, inversion=inversion, method=method)))(s)
    largest = _largest_intermediate(jaxpr.jaxpr)
    if method == "dense":
        assert largest >= m * m
    else:
        assert largest < m * m // 8, largest
