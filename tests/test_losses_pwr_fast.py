"""PWR fast methods (seed nikitin2020 eq. 3): tiled and sorted equal dense, value and gradient.

The dense method is checked against a literal NumPy loop in test_losses_pwr.py; here every fast
method is compared with it (rtol 1e-5, float32) on random and tied inputs, for every inversion
and every margin (pair level, batched with vmap so each variant compiles once) and both
relations (embedding level).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdface.losses import _pwr, _pwr_common, _pwr_tiled, pwr_loss
from kdface.losses._pwr_common import Inversion

M = 300  # scores: above one 256-tile so the tiled sweep has off-diagonal tiles and padding
MARGINS = [("none", 0.0), ("const", 0.1), ("teacher_std", 0.0), ("teacher_diff", 0.0)]
VARIANTS = [("diff", 1.0, 1.0), ("power", 2.0, 1.0), ("power", 3.0, 1.0), ("power", 0.5, 1.0),
            ("exp", 1.0, 1.0), ("exp", 1.0, 3.0), ("exp", 1.0, 20.0), ("ranknet", 1.0, 2.0)]


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


def _assert_same(got, want, what: str):
    (v, (gx, gy)), (v0, (gx0, gy0)) = got, want
    np.testing.assert_allclose(np.asarray(v), np.asarray(v0), rtol=1e-5, atol=1e-7,
                               err_msg=f"{what} value")
    for g, g0, name in ((gx, gx0, "dx"), (gy, gy0, "dy")):
        scale = np.abs(np.asarray(g0)).max(axis=1, keepdims=True) + 1e-30
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(g0) / scale, rtol=0,
                                   atol=1e-5, err_msg=f"{what} {name}")


@pytest.fixture(scope="module")
def problems():
    return tuple(jnp.asarray(a) for a in _problems())


@pytest.mark.parametrize("kind,power,beta", VARIANTS)
def test_tiled_equals_dense_every_margin_and_tie_pattern(problems, kind, power, beta):
    t, x, y = problems
    inversion = Inversion(kind, power, beta)
    want = _mean_fn("dense", inversion)(x, y, t)
    _assert_same(_mean_fn("tiled", inversion)(x, y, t), want, f"tiled {kind} {power} {beta}")


def test_tiled_exp_falls_back_when_scores_exceed_the_factor_bound():
    # Scores far wider than [-1, 1]: beta * range > 60, the run-time check must pick per-pair exp.
    rng = np.random.default_rng(1)
    t = jnp.asarray(rng.normal(size=200).astype(np.float32))
    x = jnp.asarray(rng.uniform(-30, 30, 200).astype(np.float32))
    inversion = Inversion("exp", 1.0, 1.0)
    got = _pwr_tiled.tiled_pair_sum(t, x, x, inversion, 4.0, block=64)[0]
    want = _pwr.dense_pair_sum(t, x, x, inversion)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


# --------------------------------------------------------------------------- embedding level

def _embeddings(n: int, seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, 8)).astype(np.float32)
    t = rng.normal(size=(n, 16)).astype(np.float32)
    if ties:  # duplicate teacher rows tie teacher scores; duplicate student rows tie students
        t[1], t[2] = t[0], t[0]
        s[5] = s[4]
    return jnp.asarray(s), jnp.asarray(t)


@pytest.mark.parametrize("relation", ["cosine", "euclidean"])
@pytest.mark.parametrize("method", ["tiled"])
@pytest.mark.parametrize("inversion,margin,margin_value", [
    ("exp", "teacher_diff", 0.0), ("diff", "const", 0.1), ("power", "none", 0.0),
    ("ranknet", "teacher_std", 0.0)])
def test_embeddings_equal_dense(relation, method, inversion, margin, margin_value):
    kw = dict(relation=relation, inversion=inversion, margin=margin, margin_value=margin_value,
              power=2.0, beta=2.0)

    def loss(m):
        return jax.jit(jax.value_and_grad(lambda a, b: pwr_loss(a, b, method=m, **kw)))
    fast, dense = loss(method), loss("dense")
    for seed, ties in ((0, False), (1, True)):
        s, t = _embeddings(24, seed, ties)
        (v, g), (v0, g0) = fast(s, t), dense(s, t)
        np.testing.assert_allclose(float(v), float(v0), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(g0).max()))
