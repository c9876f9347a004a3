"""PWR (Nikitin et al. 2020 eqs. 3-11), dense method, against a literal NumPy float64 reference."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from _tolerance import assert_close
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


# ----------------------------------------------- float64 value, gradient and error magnitudes
# Used by the tolerance rule (tests/_tolerance.py) here and in test_losses_pwr_{fast,ties,
# sharded}.py: the float32 losses are compared with these float64 results, each element bounded
# by eps x (its reduction length) x (the float64 sum of the absolute values of its terms).

def _penalty_and_slope64(z: np.ndarray, inversion: str, power: float, beta: float):
    """l(z), l'(z) of eqs. (4)-(6), (11) in float64 (slope 0 at z <= 0 as in kdface)."""
    pos = z > 0
    zp = np.where(pos, z, 0.0)
    if inversion == "diff":
        return zp, pos.astype(np.float64)
    if inversion == "power":
        safe = np.where(pos, z, 1.0)
        return np.where(pos, safe ** power, 0.0), np.where(pos, power * safe ** (power - 1), 0.0)
    if inversion == "exp":
        return np.expm1(beta * zp), np.where(pos, beta * np.exp(beta * zp), 0.0)
    return np.logaddexp(0.0, beta * z), beta / (1.0 + np.exp(-beta * z))


def ref_pair_terms64(x, y, t, *, inversion="exp", power=1.0, beta=1.0, tie_tolerance=0.0,
                     block=512):
    """Eq. (3) over per-score values, in float64, pair z_ab = x_b - y_a for the teacher-ordered
    pairs t_b < t_a - tol (``_pwr_common``'s form): ``(value, value_scale, (gx, gx_scale),
    (gy, gy_scale), count)``, by blocks of ``block`` rows a (M^2 is not held at once).

    value_scale: the mean over the ordered pairs of |l(z)| + |l'(z)| (|x_b| + |y_a|): each pair
    term and the first-order effect of rounding its inputs in float32. gx, gy: d value / dx,
    d value / dy; gx_scale, gy_scale: the mean of |l'(z)| over the ordered pairs each score is
    in (the magnitude of the terms summed into each element of the gradient). The teacher order
    is decided in float32 (``t`` as given and the threshold ``t - tol`` rounded to float32, as
    in the float32 loss)."""
    x, y, t = (np.asarray(v, np.float64) for v in (x, y, t))
    threshold = (np.asarray(t, np.float32) - np.float32(tie_tolerance)).astype(np.float64)
    total = total_scale = 0.0
    count = 0
    gx, gx_scale = np.zeros_like(x), np.zeros_like(x)
    gy, gy_scale = np.zeros_like(y), np.zeros_like(y)
    for a0 in range(0, len(t), block):
        rows = slice(a0, a0 + block)
        ordered = t[None, :] < threshold[rows, None]           # rows a above columns b
        z = x[None, :] - y[rows, None]
        pen, slope = _penalty_and_slope64(z, inversion, power, beta)
        pen, slope = np.where(ordered, pen, 0.0), np.where(ordered, slope, 0.0)
        count += int(ordered.sum())
        total += pen.sum()
        total_scale += (np.abs(pen) + np.abs(slope) * (np.abs(x)[None, :]
                                                       + np.abs(y[rows])[:, None])).sum()
        gx += slope.sum(0)                                     # dz/dx_b = 1
        gx_scale += np.abs(slope).sum(0)
        gy[rows] -= slope.sum(1)                               # dz/dy_a = -1
        gy_scale[rows] += np.abs(slope).sum(1)
    c = max(count, 1)
    return (total / c, total_scale / c, (gx / c, gx_scale / c), (gy / c, gy_scale / c), count)


def ref_scores_terms64(ps, pt, *, inversion="exp", margin="teacher_diff", margin_value=0.0,
                       power=1.0, beta=1.0, tie_tolerance=0.0):
    """``ref_pair_terms64`` of student scores ``ps`` and teacher scores ``pt`` with the margin
    folded in (``_pwr.pair_values``): ``(value, value_scale, grad, grad_scale, count)``, grad
    and grad_scale ``[M]`` with respect to ``ps``. Pass the float32 teacher scores: the ties
    and the order are decided in float32."""
    ps, pt = np.asarray(ps, np.float64), np.asarray(pt, np.float64)
    alpha = {"none": 0.0, "const": margin_value, "teacher_std": float(np.std(pt)),
             "teacher_diff": 0.0}[margin]
    x = ps - pt if margin == "teacher_diff" else ps + alpha
    y = ps - pt if margin == "teacher_diff" else ps
    value, value_scale, (gx, sx), (gy, sy), count = ref_pair_terms64(
        x, y, pt, inversion=inversion, power=power, beta=beta, tie_tolerance=tie_tolerance)
    return value, value_scale, gx + gy, sx + sy, count


def ref_embeddings_terms64(s, t, *, relation="cosine", **options):
    """``ref_scores_terms64`` through the scores' chain rule: ``(value, value_scale, grad,
    grad_scale, count)`` with grad, grad_scale ``[N, D_s]``.

    The scores and their Jacobian [M, N, D_s] are kdface's ``pairwise_scores`` under x64 (checked
    against the literal ``ref_scores`` loop in test_scores_match_reference); the teacher order
    comes from the float32 teacher scores, as in the float32 loss. grad_scale[i, d] =
    sum_k grad_scale_k |d psi_k / d e_id|."""
    with jax.enable_x64(True):
        s64 = jnp.asarray(np.asarray(s, np.float64))
        ps = np.asarray(pairwise_scores(s64, relation=relation))
        jac = np.asarray(jax.jacfwd(lambda e: pairwise_scores(e, relation=relation))(s64))
    pt = np.asarray(pairwise_scores(jnp.asarray(t, jnp.float32), relation=relation))
    value, value_scale, g, g_scale, count = ref_scores_terms64(ps, pt, **options)
    grad_scale = np.einsum("k,knd->nd", g_scale, np.abs(jac))
    if relation == "euclidean":
        # psi = sqrt(d^2), d^2 = |e_i|^2 + |e_j|^2 - 2 cos cancels terms of size ~1: float32's
        # d psi / d e_i = (e_i - e_j) / psi (normalized rows) is a difference of terms of size
        # |e_id| + |e_jd| divided by the float32 psi, which for near-duplicate rows is rounding
        # noise ~sqrt(eps) (float64 clips it at 1e-6 and has slope 0): the Jacobian's own
        # rounding, eps (|e_id| + |e_jd|) / (psi_32 |e_i|) per unit of d value / d psi_k.
        psi32 = np.asarray(pairwise_scores(jnp.asarray(s, jnp.float32), relation=relation),
                           np.float64)
        raw = np.asarray(s, np.float64)
        unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        i, j = np.triu_indices(len(raw), 1)
        per_pair = (g_scale / psi32)[:, None] * (np.abs(unit[i]) + np.abs(unit[j]))
        cond = np.zeros_like(raw)
        np.add.at(cond, i, per_pair / np.linalg.norm(raw[i], axis=1, keepdims=True))
        np.add.at(cond, j, per_pair / np.linalg.norm(raw[j], axis=1, keepdims=True))
        grad_scale = grad_scale + cond
    return value, value_scale, np.einsum("k,knd->nd", g, jac), grad_scale, count


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
    kw = dict(inversion=inversion, margin=margin, margin_value=margin_value, power=power,
              beta=beta)
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda a, b: pwr_loss_from_scores_eager(a, b, method="dense", **kw)))
    for ps, pt in cases:
        ps, pt = ps.astype(np.float32), pt.astype(np.float32)
        got, grad = value_and_grad(jnp.asarray(ps), jnp.asarray(pt))
        want = ref_pwr(ps, pt, inversion, power, beta, margin, margin_value)
        v64, v_scale, g64, g_scale, count = ref_scores_terms64(ps, pt, **kw)
        # The vectorized float64 reference (used for gradients and by the other PWR test files)
        # is the literal loop: float64 sums of `count` terms.
        assert_close(v64, want, terms=count, scale=v_scale, dtype=np.float64)
        # The mean of `count` pair terms (<= 40^2); scale: their float64 magnitude with the
        # first-order effect of rounding their inputs (ref_scores_terms64).
        assert_close(float(got), want, terms=count, scale=v_scale)
        # d/ds_k: a sum over the <= M - 1 ordered pairs score k is in (and the mean's division);
        # per-element scale: the float64 sum of those pairs' |l'(z)| / count.
        assert_close(np.asarray(grad), g64, terms=len(ps), scale=g_scale)


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
    _, v_scale, _, _, count = ref_embeddings_terms64(
        s, t, relation=relation, inversion=inversion, margin=margin, margin_value=margin_value,
        power=power, beta=beta)
    # The mean of `count` pair terms (<= M^2 = 36^2), each from scores that are sums of D <= 7
    # products; scale: the terms' float64 magnitude and the first-order effect of rounding
    # their inputs (ref_scores_terms64).
    assert_close(float(got), want, terms=count + 2 * 7, scale=v_scale)


def test_scores_match_reference():
    e = _emb(4, 7, 3)
    unit = e.astype(np.float64) / np.linalg.norm(e.astype(np.float64), axis=1, keepdims=True)
    i, j = np.triu_indices(len(e), 1)
    cos_scale = np.abs(unit[i] * unit[j]).sum(1)   # the |terms| of each normalized dot product
    for relation in ("cosine", "euclidean"):
        want = np.asarray(ref_scores(e, relation))
        # The norm (D = 3 squares) and the dot product (D = 3 products): 2 D + 2 roundings.
        # Euclidean: d^2 = |e_i|^2 + |e_j|^2 - 2 cos cancels terms of size ~2 + 2 |cos|, whose
        # absolute error d = sqrt(d^2) divides by 2 d.
        scale = cos_scale if relation == "cosine" else (2 + 2 * cos_scale) / (2 * want)
        assert_close(np.asarray(pairwise_scores(jnp.asarray(e), relation=relation)), want,
                     terms=2 * 3 + 2, scale=scale, what=relation + " ")


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
    # Exact decimals against float32 inputs: the mean of 3 pair terms (plus the few roundings
    # of z and l(z) each); scale: the terms' magnitude and the effect of rounding 0.9, 0.5,
    # 0.1 to float32 (ref_scores_terms64).
    def check(got, want, ps, pt, **kw):
        scale = ref_scores_terms64(np.asarray(ps), np.asarray(pt), **kw)[1]
        assert_close(float(got), want, terms=3 + 3, scale=scale)

    got = pwr_loss_from_scores(s, t, inversion="diff", margin="none", method="dense")
    check(got, 1.6 / 3, s, t, inversion="diff", margin="none")
    got = pwr_loss_from_scores(s, t, inversion="exp", beta=2.0, margin="const",
                               margin_value=0.1, method="dense")
    want = (2 * math.expm1(2 * 0.5) + math.expm1(2 * 0.9)) / 3
    check(got, want, s, t, inversion="exp", beta=2.0, margin="const", margin_value=0.1)
    # RankNet of a correctly ordered student still costs log(1 + e^{-beta |gap|}) per pair.
    got = pwr_loss_from_scores(t, t, inversion="ranknet", beta=1.0, margin="none",
                               method="dense")
    want = (2 * math.log1p(math.exp(-0.4)) + math.log1p(math.exp(-0.8))) / 3
    check(got, want, t, t, inversion="ranknet", beta=1.0, margin="none")


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
        # Exact int32 chunk sums, each rounded to float32 and added in float32: one rounding per
        # chunk and one per addition; scale: the exact count (all terms are positive).
        chunks = -(-m // _pwr_common.count_chunk(m))
        assert_close(got, want, terms=2 * chunks, scale=want)


def test_sum_counts_chunks_do_not_overflow():
    m = 200_000
    counts = jnp.full((m,), m - 1, jnp.int32)
    # As above: one rounding per int32 chunk sum cast to float32 and per float32 addition.
    chunks = -(-m // _pwr_common.count_chunk(m))
    assert_close(float(_pwr_common.sum_counts(counts)), m * (m - 1), terms=2 * chunks,
                 scale=m * (m - 1))


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
        # Not the float32 rule: float64 central differences with step 1e-6 (truncation
        # ~1e-12 x the third derivative, rounding ~1e-10), within check_grads' own tolerances.
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
