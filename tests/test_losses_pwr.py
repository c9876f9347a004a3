"""PWR (Nikitin et al. 2020 eqs. 3-11), dense method, against a literal NumPy float64 reference."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdface.losses import _pwr, _pwr_common, pairwise_scores
from kdface.losses import pwr_loss as pwr_loss_eager
from kdface.losses import pwr_loss_from_scores as pwr_loss_from_scores_eager

_OPTIONS = ("relation", "inversion", "margin", "margin_value", "power", "beta", "method")
# Jitted with static options: one compile per configuration instead of one per eager op.
pwr_loss = jax.jit(pwr_loss_eager, static_argnames=_OPTIONS)
pwr_loss_from_scores = jax.jit(pwr_loss_from_scores_eager, static_argnames=_OPTIONS[1:])

INVERSIONS = [("diff", 1.0), ("power", 2.0), ("power", 0.5), ("exp", 1.0), ("exp", 3.0),
              ("ranknet", 2.0)]
MARGINS = [("none", 0.0), ("const", 0.1), ("teacher_std", 0.0), ("teacher_diff", 0.0)]


# ---------------------------------------------------------------- the reference (paper, literal)

def ref_scores(emb: np.ndarray, relation: str) -> list[float]:
    """psi over pairs i < j (row-major) of L2-normalized embeddings, float64."""
    e = np.asarray(emb, np.float64)
    e = e / np.sqrt((e * e).sum(1, keepdims=True) + 1e-12)
    out = []
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            if relation == "cosine":
                out.append(float(e[i] @ e[j]))
            else:
                out.append(math.sqrt(max(float(((e[i] - e[j]) ** 2).sum()), 1e-12)))
    return out


def ref_inversion(z: float, inversion: str, power: float, beta: float) -> float:
    if inversion == "diff":                                   # eq. (4), margins eqs. (7)-(9)
        return max(z, 0.0)
    if inversion == "power":                                  # eq. (5)
        return max(z, 0.0) ** power
    if inversion == "exp":                                    # eq. (6)
        return max(math.exp(beta * z) - 1.0, 0.0)
    return math.log(1.0 + math.exp(beta * z))                 # eq. (11), z = -(s_i - s_j - m)


def ref_pwr(ps, pt, inversion, power, beta, margin, margin_value) -> float:
    """Eq. (3) averaged over the pairs with 1[psi_i^T > psi_j^T] (loop over pairs of pairs)."""
    ps, pt = [float(v) for v in ps], [float(v) for v in pt]
    std = float(np.std(np.asarray(pt)))
    total, count = 0.0, 0
    for i in range(len(pt)):
        for j in range(len(pt)):
            if not pt[i] > pt[j]:
                continue
            alpha = {"none": 0.0, "const": margin_value, "teacher_std": std,
                     "teacher_diff": pt[i] - pt[j]}[margin]
            total += ref_inversion(ps[j] - ps[i] + alpha, inversion, power, beta)
            count += 1
    return total / count if count else 0.0


def _emb(seed: int, n: int, d: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


# ------------------------------------------------------------------------------------- values

@pytest.mark.parametrize("inversion,param", INVERSIONS)
@pytest.mark.parametrize("margin,margin_value", MARGINS)
def test_dense_scores_match_reference(inversion, param, margin, margin_value):
    """Random scores, and scores with ties in teacher and student (multiples of 1/4 are exact
    in float32), through one compiled function."""
    power = param if inversion == "power" else 1.0
    beta = param if inversion in ("exp", "ranknet") else 1.0
    rng = np.random.default_rng(3)
    cases = [(rng.uniform(-1, 1, 40), rng.uniform(-1, 1, 40)),
             (rng.integers(-4, 5, 40) / 4, rng.integers(-3, 4, 40) / 4)]
    for ps, pt in cases:
        ps, pt = ps.astype(np.float32), pt.astype(np.float32)
        got = pwr_loss_from_scores(jnp.asarray(ps), jnp.asarray(pt), inversion=inversion,
                                   margin=margin, margin_value=margin_value, power=power,
                                   beta=beta, method="dense")
        want = ref_pwr(ps, pt, inversion, power, beta, margin, margin_value)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("relation,inversion,param,margin,margin_value", [
    ("cosine", "exp", 1.0, "teacher_diff", 0.0), ("euclidean", "diff", 1.0, "const", 0.1),
    ("cosine", "power", 0.5, "teacher_std", 0.0), ("euclidean", "ranknet", 2.0, "none", 0.0),
    ("euclidean", "exp", 3.0, "teacher_std", 0.0)])
def test_dense_embeddings_match_reference(relation, inversion, param, margin, margin_value):
    power = param if inversion == "power" else 1.0
    beta = param if inversion in ("exp", "ranknet") else 1.0
    s, t = _emb(1, 9, 5), _emb(11, 9, 7)   # D differs between student and teacher
    got = pwr_loss(jnp.asarray(s), jnp.asarray(t), relation=relation, inversion=inversion,
                   margin=margin, margin_value=margin_value, power=power, beta=beta,
                   method="dense")
    want = ref_pwr(ref_scores(s, relation), ref_scores(t, relation), inversion, power, beta,
                   margin, margin_value)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_scores_match_reference():
    e = _emb(4, 7, 3)
    for relation in ("cosine", "euclidean"):
        np.testing.assert_allclose(np.asarray(pairwise_scores(jnp.asarray(e), relation=relation)),
                                   ref_scores(e, relation), rtol=1e-5, atol=1e-6)


def test_pair_rows_match_triu_indices():
    for n in (2, 3, 10, 1000):
        i, j = jax.jit(_pwr.pair_rows, static_argnums=0)(n)
        ri, rj = np.triu_indices(n, 1)
        np.testing.assert_array_equal(np.asarray(i), ri)
        np.testing.assert_array_equal(np.asarray(j), rj)


# ------------------------------------------------------------------------------- known answers

def test_hand_computed_reversed_ranking():
    # Teacher ranks 0.9 > 0.5 > 0.1, the student the reverse: pairs (0,1), (0,2), (1,2) with
    # z = s_b - s_a = 0.4, 0.8, 0.4.
    t = jnp.array([0.9, 0.5, 0.1])
    s = jnp.array([0.1, 0.5, 0.9])
    got = pwr_loss_from_scores(s, t, inversion="diff", margin="none", method="dense")
    np.testing.assert_allclose(float(got), 1.6 / 3, rtol=1e-6)
    got = pwr_loss_from_scores(s, t, inversion="exp", beta=2.0, margin="const",
                               margin_value=0.1, method="dense")
    want = (2 * math.expm1(2 * 0.5) + math.expm1(2 * 0.9)) / 3
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    # RankNet of a correctly ordered student still costs log(1 + e^{-beta |gap|}) per pair.
    got = pwr_loss_from_scores(t, t, inversion="ranknet", beta=1.0, margin="none",
                               method="dense")
    want = (2 * math.log1p(math.exp(-0.4)) + math.log1p(math.exp(-0.8))) / 3
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.mark.parametrize("inversion", ["diff", "power", "exp"])
@pytest.mark.parametrize("margin", ["none", "teacher_diff"])
def test_zero_when_student_equals_teacher(inversion, margin):
    e = jnp.asarray(_emb(5, 12, 6))
    assert float(pwr_loss(e, e, inversion=inversion, power=2.0, margin=margin,
                          method="dense")) == 0.0


def test_all_teacher_ties_gives_zero():
    t = jnp.ones((6, 4))
    assert float(pwr_loss(jnp.asarray(_emb(6, 6, 4)), t, method="dense")) == 0.0


def test_ordered_pair_count_beyond_int32():
    """M^2 > 2^31 ordered pairs: the count helper must not overflow (no loss is built)."""
    for m, levels in ((50_001, 7),):
        t = np.random.default_rng(m).integers(0, levels, m).astype(np.float32)
        _, sizes = np.unique(t, return_counts=True)
        want = (m * m - int((sizes.astype(np.int64) ** 2).sum())) // 2
        assert m * m > 2**31
        got = float(_pwr_common.ordered_pair_count(jnp.asarray(t)))
        np.testing.assert_allclose(got, want, rtol=2e-7)


def test_sum_counts_chunks_do_not_overflow():
    m = 200_000
    counts = jnp.full((m,), m - 1, jnp.int32)
    np.testing.assert_allclose(float(_pwr_common.sum_counts(counts)), m * (m - 1), rtol=2e-7)


# ------------------------------------------------------------------------ gradients, jit, dtype

@pytest.mark.parametrize("inversion,param,margin,margin_value", [
    ("diff", 1.0, "teacher_diff", 0.0), ("power", 1.5, "const", 0.1),
    ("exp", 2.0, "teacher_std", 0.0), ("exp", 1.0, "teacher_diff", 0.0),
    ("ranknet", 1.0, "none", 0.0)])
def test_dense_gradient_finite_differences(inversion, param, margin, margin_value):
    power = param if inversion == "power" else 1.0
    beta = param if inversion in ("exp", "ranknet") else 1.0
    with jax.enable_x64(True):
        s = jnp.asarray(_emb(7, 6, 4), jnp.float64)
        t = jnp.asarray(_emb(8, 6, 5), jnp.float64)
        f = jax.jit(lambda s_: pwr_loss_eager(s_, t, inversion=inversion, margin=margin,
                                              margin_value=margin_value, power=power,
                                              beta=beta, method="dense"))
        check_grads(f, (s,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5)


def test_teacher_gets_no_gradient():
    s, t = jnp.asarray(_emb(9, 8, 4)), jnp.asarray(_emb(10, 8, 4))
    g = jax.grad(lambda t_: pwr_loss(s, t_, method="dense"))(t)
    assert float(jnp.abs(g).max()) == 0.0


def test_bfloat16_inputs_compile_and_compute_in_float32():
    s, t = jnp.asarray(_emb(13, 10, 4)), jnp.asarray(_emb(14, 10, 4))
    got = jax.jit(pwr_loss_eager)(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16))
    assert got.dtype == jnp.float32 and np.isfinite(float(got))
    g = jax.jit(jax.grad(pwr_loss_eager))(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g)))


# -------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,match", [
    ({"relation": "angle"}, "relation"), ({"inversion": "hinge"}, "inversion"),
    ({"margin": "adaptive"}, "margin"), ({"method": "fast"}, "method"),
    ({"power": 0.0}, "power"), ({"power": -1.0}, "power"), ({"beta": 0.0}, "beta"),
    ({"margin": "teacher_diff", "margin_value": 0.1}, "margin_value"),
])
def test_bad_options_raise(kwargs, match):
    e = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=match):
        pwr_loss_eager(e, e, **kwargs)


def test_bad_inputs_raise():
    e = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        pwr_loss_eager(e, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="rank 2"):
        pwr_loss_eager(jnp.ones((4,)), jnp.ones((4,)))
    with pytest.raises(TypeError, match="floating"):
        pwr_loss_eager(jnp.ones((4, 3), jnp.int32), e)
    with pytest.raises(ValueError, match="N=2"):
        pwr_loss_eager(jnp.ones((1, 3)), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="same shape"):
        pwr_loss_from_scores_eager(jnp.ones(4), jnp.ones(5))
    with pytest.raises(ValueError, match="dense"):
        pwr_loss_eager(jnp.ones((400, 3)), jnp.ones((400, 3)), method="dense")
    with pytest.raises(ValueError, match="sorted"):
        pwr_loss_eager(e, e, inversion="ranknet", method="sorted")
