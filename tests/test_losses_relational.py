"""RKD-D, RKD-A, DarkRank-hard against plain float64 NumPy loops over the papers' formulas."""
from __future__ import annotations

import functools
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import EPS32, assert_close

from kdface.losses import _relational
from kdface.losses._relational import darkrank_hard_loss, rkd_angle_loss, rkd_distance_loss


def jitted(loss, **options):
    """Tests run the losses compiled (op-by-op dispatch is slow on a loaded CI machine);
    ``test_jit_equals_eager...`` covers the eager path."""
    return jax.jit(functools.partial(loss, **options))


def _huber(x):
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def ref_rkd_distance(s, t, reduction="mean"):
    """Park et al. eq. (3)-(4), literally: mu = mean distance over pairs i != j (floored at
    1e-6, kdface's definition for a batch whose rows all coincide)."""
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = max(np.mean([np.linalg.norm(s[i] - s[j]) for i, j in pairs]), 1e-6)
    mu_t = max(np.mean([np.linalg.norm(t[i] - t[j]) for i, j in pairs]), 1e-6)
    out = np.zeros((n, n))
    for i, j in pairs:
        out[i, j] = _huber(np.linalg.norm(s[i] - s[j]) / mu_s
                           - np.linalg.norm(t[i] - t[j]) / mu_t)
    if reduction is None:
        return out
    return out.sum() if reduction == "sum" else out.sum() / len(pairs)


def _unit(v):
    norm = np.linalg.norm(v)
    return v / norm if norm > 1e-12 else 0.0 * v  # F.normalize semantics: 0 stays 0


def _cos_at_vertex(e, i, j, k):
    return float(_unit(e[i] - e[j]) @ _unit(e[k] - e[j]))


def ref_rkd_angle(s, t):
    """Park et al. eq. (5)-(6): Huber(cos_s - cos_t) over ordered triplets of distinct indices,
    vertex j in the middle."""
    n = len(s)
    terms = [_huber(_cos_at_vertex(s, i, j, k) - _cos_at_vertex(t, i, j, k))
             for i, j, k in itertools.permutations(range(n), 3)]
    return np.mean(terms)


def ref_darkrank(s, t, alpha=3.0, beta=3.0, list_length=None, reduction="mean"):
    """DarkRank-hard: per anchor, Plackett-Luce NLL of the teacher's order of the others."""
    n = len(s)
    per_anchor = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        others.sort(key=lambda j: (np.linalg.norm(t[i] - t[j]), j))
        if list_length is not None:
            others = others[:list_length]
        scores = [-alpha * np.linalg.norm(s[i] - s[j]) ** beta for j in others]
        nll = 0.0
        for k in range(len(scores)):
            tail = np.array(scores[k:])
            lse = tail.max() + np.log(np.sum(np.exp(tail - tail.max())))
            nll -= scores[k] - lse
        per_anchor.append(nll)
    per_anchor = np.array(per_anchor)
    if reduction is None:
        return per_anchor
    return per_anchor.sum() if reduction == "sum" else per_anchor.mean()


def numerical_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


def _pair(n, d_s=5, d_t=3, seed=0, scale=1.0):
    """float64 arrays holding float32 values: the references see the inputs kdface sees."""
    rng = np.random.default_rng(seed)
    s, t = rng.normal(size=(n, d_s)) * scale, rng.normal(size=(n, d_t)) * scale
    return s.astype(np.float32).astype(np.float64), t.astype(np.float32).astype(np.float64)


# ------------------------------------------------------------------------------ error bounds
# The losses build distances from the Gram matrix of the centred embeddings:
# d^2 = |a|^2 + |b|^2 - 2 a.b has an error of ~D eps (|a|^2 + |b|^2), i.e. a relative error of
# D eps kappa with kappa = (|a|^2 + |b|^2) / d^2 (the cancellation). The helpers below give, in
# float64, the bound each loss's rounding is measured against.
#
# RKD-D and RKD-A sum T = N(N-1) pair terms or N(N-1)(N-2) triplet terms: their bound has two
# parts, so it is passed to assert_close as terms=1 and scale = the whole bound in eps-units
# (_tolerance.py takes one growth per call; a local work-around):
#   * the long sum itself: the rounding of T independent terms, of both signs (round to
#     nearest), adds like a random walk: sqrt(T) x sum|h| (Higham 2002 sec. 4.2, the rule's
#     "sqrt" growth). The linear T eps would be 2e-4..1.5e-2 of the value at these sizes, too
#     loose to see one dropped pair or triplet.
#   * each term's own error, from Gram dots shared between terms (correlated, so linear):
#     the sum over the terms of min(|x|, 1) (err_s + err_t), err in eps-units with its D.

def _gram_kappa(e, center=True):
    """[N, N] cancellation factors (|a|^2 + |b|^2) / d^2 (0 where d = 0) of the Gram distances;
    ``center=False`` measures against the raw coordinates (inputs whose float32 rounding was
    relative to a shift, not to the spread)."""
    e = np.asarray(e, np.float64)
    c = e - e.mean(0) if center else e
    sq = np.sum(c * c, 1)
    d2 = np.sum((e[:, None] - e[None]) ** 2, -1)
    return np.where(d2 > 0, (sq[:, None] + sq[None]) / np.where(d2 > 0, d2, 1.0), 0.0)


def _huber_and_slope(x):
    return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5), np.minimum(np.abs(x), 1.0)


def _rkd_distance_pairs(s, t, center=True):
    """Per pair: h = huber(x), x = d_s / mu_s - d_t / mu_t, and x's error in eps-units:
    |x_s| (D kappa_s / 2 + err(mu_s)) + the same for t, d's relative error being half d^2's
    and mu's that of a mean over the N(N-1) pairs: the mean of d D kappa / 2 over mu, plus
    sqrt(N(N-1)) for the mean's own sum."""
    n = len(s)
    off = ~np.eye(n, dtype=bool)
    per = []
    for e in (s, t):
        d = np.sqrt(np.sum((e[:, None] - e[None]) ** 2, -1))
        mu = max(d[off].mean(), 1e-6)
        rel_d = e.shape[1] * _gram_kappa(e, center) / 2
        rel_mu = (d * rel_d)[off].mean() / mu + math.sqrt(n * (n - 1))
        per.append((d / mu, d / mu * (rel_d + rel_mu)))
    x = per[0][0] - per[1][0]
    return np.where(off, x, 0.0), np.where(off, per[0][1] + per[1][1], 0.0), off


def _rkd_distance_terms_scale(s, t, reduction="mean", center=True):
    """RKD-D: (1, the bound in eps-units): sqrt(T) sum|h| + sum min(|x|, 1) err(x) over the T
    pairs (see above), per pair (None), or summed / averaged."""
    x, err, off = _rkd_distance_pairs(s, t, center)
    h, slope = _huber_and_slope(x)
    if reduction is None:
        return 1, np.where(off, h + slope * err, 0.0)
    pairs = int(off.sum())
    total = math.sqrt(pairs) * h.sum() + (slope * err).sum()
    return 1, float(total / (1 if reduction == "sum" else pairs))


def _angle_cos_and_error(e):
    """[N, N, N] cosines at vertex j (index order i, j, k) and their error in eps-units: the
    numerator g_ik - g_ij - g_jk + g_jj, four D-term dots, against D (|g_ik| + |g_ij| + |g_jk| +
    |g_jj|) / (d_ij d_jk), plus |cos| times the two distances' relative errors D kappa / 2;
    0 where a direction is 0 (duplicates)."""
    e = np.asarray(e, np.float64)
    c = e - e.mean(0)
    g = c @ c.T
    diff = e[:, None] - e[None]                              # [i, j]: e_i - e_j
    d = np.sqrt(np.sum(diff ** 2, -1))
    ok = d > 0
    unit = np.where(ok[..., None], diff / np.where(ok, d, 1.0)[..., None], 0.0)
    cos = np.einsum("ijd,kjd->ijk", unit, unit)
    gj = np.diagonal(g)
    mag = (np.abs(g)[:, None, :] + np.abs(g)[:, :, None] + np.abs(g).T[None, :, :]
           + np.abs(gj)[None, :, None])                      # |g_ik| + |g_ij| + |g_jk| + |g_jj|
    inv = np.where(ok, 1.0 / np.where(ok, d, 1.0), 0.0)
    kap = _gram_kappa(e) / 2
    err = e.shape[1] * (mag * inv[:, :, None] * inv.T[None, :, :]
                        + np.abs(cos) * (kap[:, :, None] + kap.T[None, :, :]))
    return cos, np.where(ok[:, :, None] & ok.T[None, :, :], err, 0.0)


def _rkd_angle_terms_scale(s, t):
    """RKD-A: (1, the bound in eps-units) of the mean over the T ordered triplets of distinct
    indices: (sqrt(T) sum|h| + sum min(|x|, 1) (err_s + err_t)) / T, x = cos_s - cos_t, the
    cosines' errors from _angle_cos_and_error."""
    n = len(s)
    (cs, es), (ct, et) = _angle_cos_and_error(s), _angle_cos_and_error(t)
    i, j, k = np.array(list(itertools.permutations(range(n), 3))).T
    h, slope = _huber_and_slope(cs[i, j, k] - ct[i, j, k])
    total = math.sqrt(len(h)) * h.sum() + np.sum(slope * (es[i, j, k] + et[i, j, k]))
    return 1, float(total / len(h))


def _darkrank_terms_scale(s, t, alpha=3.0, beta=3.0, list_length=None, reduction="mean"):
    """DarkRank: each anchor's Plackett-Luce NLL sums lse(tail_k) - score_k over its list of L:
    L terms of magnitude |lse_k| + |score_k| <= 2 max|score| + log L, each score
    -alpha d^beta carrying beta times d's relative error (D eps kappa / 2): per anchor scale
    L (2 max|score| + log L) (1 + beta max kappa / 2); the batch reduction adds N terms."""
    n = len(s)
    length = n - 1 if list_length is None else list_length
    d = np.sqrt(np.sum((s[:, None] - s[None]) ** 2, -1))
    score = alpha * d ** beta
    kap = _gram_kappa(s)
    per_anchor = (length * (2 * score.max(1) + math.log(length))
                  * (1 + beta * kap.max(1) / 2))
    terms = length + n + s.shape[1]
    if reduction is None:
        return terms, per_anchor
    return terms, float(per_anchor.sum() if reduction == "sum" else per_anchor.mean())


def _f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


# ------------------------------------------------------------------------------ RKD-D

@pytest.mark.parametrize("n", [4, 9])
@pytest.mark.parametrize("reduction", ["mean", "sum", None])
def test_rkd_distance_matches_loop(n, reduction):
    s, t = _pair(n, seed=n)
    got = jitted(rkd_distance_loss, reduction=reduction)(*_f32(s, t))
    # float32 vs the float64 loop; terms and scale from _rkd_distance_terms_scale
    terms, scale = _rkd_distance_terms_scale(s, t, reduction)
    assert_close(got, ref_rkd_distance(s, t, reduction), terms=terms, scale=scale)


def test_rkd_distance_zero_for_equal_and_scale_invariant():
    s, t = _pair(8)
    s32, t32 = _f32(s, t)
    loss = jitted(rkd_distance_loss)
    # exact answer 0: what is left is h = x^2 / 2 of x's rounding alone, x off by at most
    # err(x) eps (both sides' errors, _rkd_distance_pairs): second order, (err eps)^2 / 2
    # = eps x 1 term x scale eps err^2 / 2, with the largest pair's err
    _, err, _ = _rkd_distance_pairs(s, s)
    assert_close(float(loss(s32, s32)), 0.0, terms=1, scale=EPS32 * err.max() ** 2 / 2)
    # Invariance, each against the float64 loss of the original (s, t). The transformed
    # inputs carry one more rounding each (relative eps / 2, below the Gram's D eps kappa):
    # 2 x the bound. The shifted ones round relative to the shift, so their cancellation
    # factors are taken on the raw (uncentred) coordinates.
    want = ref_rkd_distance(s, t)
    terms, scale = _rkd_distance_terms_scale(s, t)
    assert_close(loss(3.7 * s32, t32), want, terms=2 * terms, scale=scale)
    _, scale = _rkd_distance_terms_scale(s + 5.0, 0.1 * t, center=False)
    assert_close(loss(s32 + 5.0, 0.1 * t32), want, terms=2 * terms, scale=scale)


@pytest.mark.parametrize("side", ["teacher", "student", "both"])
def test_rkd_distance_finite_when_all_rows_coincide(side):
    """Mean distance 0 (every row equal) used to give 0/0: NaN value and gradient."""
    s, t = _pair(6, scale=0.5)
    if side in ("teacher", "both"):
        t = np.tile(t[:1], (6, 1))
    if side in ("student", "both"):
        s = np.tile(s[:1], (6, 1))
    value, grad = jax.jit(jax.value_and_grad(rkd_distance_loss))(*_f32(s, t))
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    terms, scale = _rkd_distance_terms_scale(s, t)   # float32 vs the float64 loop
    assert_close(float(value), ref_rkd_distance(s, t), terms=terms, scale=scale)
    if side == "teacher":   # the student is still pulled together, by its exact gradient
        want = numerical_grad(lambda x: ref_rkd_distance(x, t), s)
        _grad_close(grad, want, _rkd_distance_terms_scale(s, t), ref_rkd_distance(s, t), 6 * 5)


def _grad_close(got, want, value_bound, value, n_terms):
    """float32 gradient vs float64 central differences (h = 1e-6: truncation ~h^2 and rounding
    ~1e-10 relative, far below float32's). Each entry sums the derivatives of up to the loss's
    n_terms terms (pairs, triplets, list positions): sqrt(n_terms) for that sum (independent
    roundings, as in the value's bound), plus the relative error the terms carry from the
    distances they are built of, which the value's bound measures: R = bound / |value| (in
    eps-units). terms=1, scale = max|want| (sqrt(n_terms) + R)."""
    terms, scale = value_bound
    rel = terms * scale / abs(float(value))
    assert_close(got, want, terms=1,
                 scale=float(np.abs(want).max()) * (math.sqrt(n_terms) + rel))


def test_rkd_distance_gradient_matches_numpy():
    s, t = _pair(6)
    got = jax.jit(jax.grad(rkd_distance_loss))(*_f32(s, t))
    want = numerical_grad(lambda x: ref_rkd_distance(x, t), s)
    _grad_close(got, want, _rkd_distance_terms_scale(s, t), ref_rkd_distance(s, t), 6 * 5)


# ------------------------------------------------------------------------------ RKD-A

@pytest.mark.parametrize("n,block_size", [(4, None), (7, 1), (7, 3), (12, 5), (12, None)])
def test_rkd_angle_matches_loop(n, block_size):
    s, t = _pair(n, seed=n)
    got = jitted(rkd_angle_loss, block_size=block_size)(*_f32(s, t))
    # float32 vs the float64 loop; terms and scale from _rkd_angle_terms_scale
    terms, scale = _rkd_angle_terms_scale(s, t)
    assert_close(got, ref_rkd_angle(s, t), terms=terms, scale=scale)


def test_rkd_angle_zero_for_equal_and_similarity_invariant():
    s, t = _pair(8)
    s32, t32 = _f32(s, t)
    loss = jitted(rkd_angle_loss)
    # exact answer 0: what is left is h = x^2 / 2 of the cosines' rounding alone, x off by
    # at most 2 err eps (both sides, _angle_cos_and_error): second order, eps x scale 2 eps err^2
    err = _angle_cos_and_error(s)[1].max()
    assert_close(float(loss(s32, s32)), 0.0, terms=1, scale=EPS32 * 2 * err ** 2)
    # similarity invariance, against the float64 loss of the original (s, t): the transformed
    # inputs carry one more rounding each (relative eps / 2; the shift -1 is below the spread,
    # so the centred kappa still holds): 2 x the bound
    terms, scale = _rkd_angle_terms_scale(s, t)
    assert_close(loss(2.5 * s32 - 1.0, t32), ref_rkd_angle(s, t), terms=2 * terms, scale=scale)


def test_rkd_angle_gradient_matches_numpy():
    s, t = _pair(5)
    got = jax.jit(jax.grad(jitted(rkd_angle_loss, block_size=2)))(*_f32(s, t))
    want = numerical_grad(lambda x: ref_rkd_angle(x, t), s)
    _grad_close(got, want, _rkd_angle_terms_scale(s, t), ref_rkd_angle(s, t), 5 * 4 * 3)


def test_rkd_angle_duplicate_points_give_zero_direction_and_finite_grad():
    s, t = _pair(6)
    s[3] = s[1]  # Park et al.: F.normalize(0) = 0, so the angle at a duplicate is cos 0
    s32, t32 = _f32(s, t)
    value, grad = jax.jit(jax.value_and_grad(rkd_angle_loss))(s32, t32)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    terms, scale = _rkd_angle_terms_scale(s, t)   # float32 vs the float64 loop
    assert_close(value, ref_rkd_angle(s, t), terms=terms, scale=scale)


def test_rkd_angle_with_duplicates_vs_park_formulation():
    """Park et al.'s code (all N^3 vertex-first triplets, F.normalize, mean over N^3) equals
    [N(N-1)(N-2) L + 0.5 P] / N^3, P the ordered pairs equal on exactly one side: each such
    pair's triplet (i, j, i) has cos 0 on that side and 1 on the other."""
    n = 7
    s, t = _pair(n, seed=4)
    s[1], s[4], t[2] = s[0], s[3], t[5]     # student pairs (0, 1), (3, 4); teacher (2, 5)
    park = np.mean([_huber(_cos_at_vertex(s, b, a, c) - _cos_at_vertex(t, b, a, c))
                    for a, b, c in itertools.product(range(n), repeat=3)])
    got = float(jitted(rkd_angle_loss)(*_f32(s, t)))
    n_one_sided = 6
    # float32 got (bound of _rkd_angle_terms_scale) vs float64 Park, got scaled by
    # n(n-1)(n-2)/n^3 in float64: the same terms, the scale times that factor
    factor = n * (n - 1) * (n - 2) / n**3
    terms, scale = _rkd_angle_terms_scale(s, t)
    assert_close(factor * got + 0.5 * n_one_sided / n**3, park, terms=terms, scale=factor * scale)
    # Not a rounding tolerance: the two formulations differ by 0.5 P / N^3 ~ 9e-3 here
    assert abs(park - got * (n - 1) * (n - 2) / n**2) > 1e-3   # the scaling alone is off


def _largest_hlo_array(fn, *args):
    """Element count of the largest array shape in the optimized HLO of ``fn``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    sizes = [int(np.prod([int(v) for v in dims.split(",")]))
             for dims in re.findall(r"[fsu]\d+\[(\d+(?:,\d+)*)\]", text)]
    return max(sizes)


def test_rkd_angle_never_builds_cubic_or_difference_tensor():
    n, d = 64, 48
    s, t = _f32(*_pair(n, d_s=d, d_t=d))
    forward_backward = jax.value_and_grad(
        lambda a, b: rkd_angle_loss(a, b, block_size=8))
    largest = _largest_hlo_array(forward_backward, s, t)
    assert largest < n * n * d and largest < n * n * n, largest

    def dense_angle(a, b):  # the textbook form; proves the inspection can see such arrays
        def cos(e):
            diff = e[None, :, :] - e[:, None, :]
            unit = diff / (jnp.linalg.norm(diff, axis=2, keepdims=True) + 1e-12)
            return jnp.einsum("jid,jkd->jik", unit, unit)
        return jnp.mean(_relational.huber(cos(a) - cos(b)))

    assert _largest_hlo_array(jax.value_and_grad(dense_angle), s, t) >= n * n * d


# ------------------------------------------------------------------------------ DarkRank

@pytest.mark.parametrize("n,alpha,beta,list_length", [
    (4, 3.0, 3.0, None), (9, 3.0, 3.0, None), (9, 1.5, 2.0, 4), (12, 0.5, 1.0, None)])
def test_darkrank_matches_loop(n, alpha, beta, list_length):
    s, t = _pair(n, seed=n, scale=0.5)
    got = jitted(darkrank_hard_loss, alpha=alpha, beta=beta, list_length=list_length)(*_f32(s, t))
    # float32 vs the float64 loop; terms and scale from _darkrank_terms_scale
    terms, scale = _darkrank_terms_scale(s, t, alpha, beta, list_length)
    assert_close(got, ref_darkrank(s, t, alpha, beta, list_length), terms=terms, scale=scale)


@pytest.mark.parametrize("reduction", ["sum", None])
def test_darkrank_reductions(reduction):
    s, t = _pair(7, scale=0.5)
    got = jitted(darkrank_hard_loss, reduction=reduction)(*_f32(s, t))
    terms, scale = _darkrank_terms_scale(s, t, reduction=reduction)   # float32 vs float64
    assert_close(got, ref_darkrank(s, t, reduction=reduction), terms=terms, scale=scale)


def test_darkrank_stable_for_large_scores():
    s, t = _pair(8, scale=20.0)  # scores ~ -3 * 60^3: a naive exp underflows to log(0)
    value, grad = jax.jit(jax.value_and_grad(darkrank_hard_loss))(*_f32(s, t))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    terms, scale = _darkrank_terms_scale(s, t)   # float32 vs float64; scores ~ 1e5 here
    assert_close(value, ref_darkrank(s, t), terms=terms, scale=scale)


def test_darkrank_gradient_matches_numpy():
    s, t = _pair(6, scale=0.5)
    got = jax.jit(jax.grad(darkrank_hard_loss))(*_f32(s, t))
    want = numerical_grad(lambda x: ref_darkrank(x, t), s)
    _grad_close(got, want, _darkrank_terms_scale(s, t), ref_darkrank(s, t), 6 * 5)


@pytest.mark.parametrize("scale", [1.0, 3e3])
def test_plackett_luce_gradient_matches_autodiff_of_cumlogsumexp(scale):
    """The written-out VJP against autodiff of the plain formulation (reverse cumlogsumexp),
    for lists of different lengths and for scores spanning thousands (no overflow)."""
    rng = np.random.default_rng(5)
    ranked = jnp.asarray(scale * rng.standard_normal((9, 4)), jnp.float32)   # [L, R]
    w = jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32)

    def plain(x):
        tails = jax.lax.cumlogsumexp(x, axis=0, reverse=True)
        return jnp.sum(w * jnp.sum(tails - x, axis=0))
    fused = lambda x: jnp.sum(w * _relational.plackett_luce_nll(x))   # noqa: E731
    v0, g0 = jax.jit(jax.value_and_grad(plain))(ranked)
    v1, g1 = jax.jit(jax.value_and_grad(fused))(ranked)
    # float32 vs float32 (scans vs cumlogsumexp): both err, 2 x the L = 9 terms of each list's
    # tail log-sum-exps. Value: the terms |tail_k| + |x_k|, weighted by w, summed over the
    # positions and the R = 4 lists. Gradient entry (l, r): w_r (sum_{k <= l} exp(x_l - tail_k)
    # - 1), each exponential carrying the absolute error of x_l - tail_k: scale w_r (1 +
    # sum_{k <= l} exp(x_l - tail_k) (|x_l| + |tail_k|)), all in float64.
    x = np.asarray(ranked, np.float64)
    tails = np.logaddexp.accumulate(x[::-1], axis=0)[::-1]                  # [L, R]
    w64 = np.asarray(w, np.float64)
    assert_close(v1, v0, terms=2 * 9, scale=float(np.sum(w64 * np.sum(np.abs(tails) + np.abs(x),
                                                                       axis=0))))
    assert np.all(np.isfinite(np.asarray(g1)))
    lower = np.arange(9)[:, None] >= np.arange(9)[None, :]                      # k <= l
    p = np.exp(np.where(lower[:, :, None], x[:, None, :] - tails[None, :, :], -np.inf))
    g_scale = w64 * (1 + np.sum(p * (np.abs(x)[:, None, :] + np.abs(tails)[None, :, :]), 1))
    assert_close(g1, g0, terms=2 * 9, scale=g_scale)


def test_darkrank_vmap_and_value_only_call():
    s, t = _pair(7, scale=0.5)
    s2, t2 = _pair(7, scale=0.7, seed=1)
    stacked = jax.jit(jax.vmap(darkrank_hard_loss))(*_f32(np.stack([s, s2]), np.stack([t, t2])))
    # float32 vs float64 per problem (_darkrank_terms_scale)
    (terms, scale), (_, scale2) = _darkrank_terms_scale(s, t), _darkrank_terms_scale(s2, t2)
    assert_close(stacked, [ref_darkrank(s, t), ref_darkrank(s2, t2)], terms=terms,
                 scale=np.array([scale, scale2]))


def test_darkrank_prefers_teacher_order():
    """A student that reproduces the teacher's geometry beats one with a shuffled geometry."""
    s, t = _pair(10, d_s=3, d_t=3, scale=0.5)
    t32, s32 = _f32(t, s)
    loss = jitted(darkrank_hard_loss)
    assert float(loss(t32, t32)) < float(loss(s32, t32))


# ------------------------------------------------------------------------------ all three

LOSSES = [rkd_distance_loss, rkd_angle_loss, darkrank_hard_loss]
TERMS_SCALE = {rkd_distance_loss: _rkd_distance_terms_scale,
               rkd_angle_loss: _rkd_angle_terms_scale, darkrank_hard_loss: _darkrank_terms_scale}


@pytest.mark.parametrize("loss", LOSSES)
def test_jit_equals_eager_and_teacher_is_constant(loss):
    s64, t64 = _pair(8, scale=0.5)
    s, t = _f32(s64, t64)
    # float32 vs float32 in another order (fused vs op by op): both err, 2 x the loss's terms
    terms, scale = TERMS_SCALE[loss](s64, t64)
    assert_close(jax.jit(loss)(s, t), loss(s, t), terms=2 * terms, scale=scale)
    grad_teacher = jax.grad(loss, argnums=1)(s, t)
    assert np.all(np.asarray(grad_teacher) == 0.0)


@pytest.mark.parametrize("loss", LOSSES)
def test_bfloat16_inputs_compute_in_float32(loss):
    s, t = _pair(8, scale=0.5)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    got = jax.jit(loss)(s16, t16)
    assert got.dtype == jnp.float32
    want = jax.jit(loss)(s16.astype(jnp.float32), t16.astype(jnp.float32))
    # float32 vs float32 of another compiled program (the convert fused in): 2 x the terms
    terms, scale = TERMS_SCALE[loss](np.asarray(s16, np.float64), np.asarray(t16, np.float64))
    assert_close(got, want, terms=2 * terms, scale=scale)
    assert jax.jit(jax.grad(loss))(s16, t16).dtype == jnp.bfloat16


@pytest.mark.parametrize("loss,min_n", [(rkd_distance_loss, 2), (rkd_angle_loss, 3),
                                        (darkrank_hard_loss, 2)])
def test_bad_inputs(loss, min_n):
    s, t = _f32(*_pair(6))
    with pytest.raises(ValueError, match="rank 2"):
        loss(s[0], t[0])
    with pytest.raises(ValueError, match="same number of rows N"):
        loss(s, t[:5])
    with pytest.raises(TypeError, match="floating"):
        loss(s.astype(jnp.int32), t)
    with pytest.raises(ValueError, match=f"N={min_n}"):
        loss(s[:min_n - 1], t[:min_n - 1])


def test_bad_options():
    s, t = _f32(*_pair(6))
    with pytest.raises(ValueError, match="reduction"):
        rkd_distance_loss(s, t, reduction="max")
    with pytest.raises(ValueError, match="block_size"):
        rkd_angle_loss(s, t, block_size=0)
    with pytest.raises(ValueError, match="alpha"):
        darkrank_hard_loss(s, t, alpha=-1.0)
    with pytest.raises(ValueError, match="list_length"):
        darkrank_hard_loss(s, t, list_length=0)


def test_angle_tile_budget_uses_the_global_batch():
    """Tiles are [block, rows, N] with N the whole batch, also when a device does fewer vertices;
    on the CPU (where tests run) rows = min(N, 32) and a tile stays near 2^18 elements."""
    budget, rows = _relational.ANGLE_TILE_ELEMENTS, _relational.ANGLE_TILE_ROWS
    assert _relational.angle_tile_rows(1024) == rows and _relational.angle_tile_rows(7) == 7
    assert _relational.angle_block_size(1024, 1024, None) == max(1, budget // (rows * 1024))
    assert _relational.angle_block_size(1024, 256, None) == max(1, budget // (rows * 1024))
    assert _relational.angle_block_size(8192, 8192, None) == 1
    assert _relational.angle_block_size(64, 16, None) == 16
    assert _relational.angle_block_size(64, 64, 8) == 8
    assert _relational.angle_block_size(64, 4, 8) == 4


def _angle_sum_autodiff(gs, gt, offset, n_vertices):
    """The triplet sum written densely with plain jnp ops (autodiff gives its derivatives): the
    independent reference for ``rkd_angle_sum``'s fused gradient pass."""
    def cosines(g):
        g = 0.5 * (g + g.T)
        sq = jnp.diagonal(g)
        d2 = sq[:, None] + sq[None, :] - 2.0 * g                     # [j, i]
        inv = jnp.where(d2 > 1e-9, jax.lax.rsqrt(jnp.where(d2 > 1e-9, d2, 1.0)), 0.0)
        numer = g[None] - g[:, :, None] - g[:, None, :] + sq[:, None, None]   # [j, i, k]
        return numer * inv[:, :, None] * inv[:, None, :]
    n = gs.shape[0]
    j = jnp.arange(n)[:, None, None]
    keep = ((j >= offset) & (j < offset + n_vertices)
            & (jnp.arange(n)[None, :, None] != jnp.arange(n)[None, None, :]))
    return jnp.sum(jnp.where(keep, _relational.huber(cosines(gs) - cosines(gt)), 0.0))


def _gram_angle_bounds(gs, gt, offset, n_vertices):
    """The bounds, in eps-units, of rkd_angle_sum on Gram-like inputs: (value, [n, n] gradient),
    in float64 from the same dense formula as _angle_sum_autodiff, built as in the section
    "error bounds" (sqrt growth over the triplets, linear for each term's own error). The Gram
    entries are inputs here: a cosine's numerator adds 4 of them (error 4 eps over the sum of
    their magnitudes), each squared distance 3 (relative 3 kappa / 2 on the inverse distance)."""
    def cosines(g):
        g = 0.5 * (g + g.T)
        sq = np.diagonal(g)
        d2 = sq[:, None] + sq[None, :] - 2.0 * g                                  # [j, i]
        ok = d2 > 1e-9
        inv = np.where(ok, 1.0 / np.sqrt(np.where(ok, d2, 1.0)), 0.0)
        numer = g[None] - g[:, :, None] - g[:, None, :] + sq[:, None, None]      # [j, i, k]
        mag = (np.abs(g)[None] + np.abs(g)[:, :, None] + np.abs(g)[:, None, :]
               + np.abs(sq)[:, None, None])
        kap = np.where(ok, 1.5 * (np.abs(sq)[:, None] + np.abs(sq)[None, :] + 2 * np.abs(g))
                       * inv ** 2, 0.0)
        cos = numer * inv[:, :, None] * inv[:, None, :]
        err = 4 * mag * inv[:, :, None] * inv[:, None, :] + np.abs(cos) * (kap[:, :, None]
                                                                          + kap[:, None, :])
        return cos, err, inv
    n = gs.shape[0]
    (cs, es, inv_s), (ct, et, _) = cosines(gs), cosines(gt)
    j = np.arange(n)[:, None, None]
    keep = ((j >= offset) & (j < offset + n_vertices)
            & (np.arange(n)[None, :, None] != np.arange(n)[None, None, :]))
    h, slope = _huber_and_slope(cs - ct)
    n_triplets = int(keep.sum())
    value = (math.sqrt(n_triplets) * np.sum(np.where(keep, h, 0.0))
             + np.sum(np.where(keep, slope * (es + et), 0.0)))
    # d cos / d g (any entry): through the numerator an inverse-distance product, through a
    # distance cos / d^2, each with a coefficient <= 2 (the -2 g of d^2). A triplet's
    # contribution huber'(x) dcos errs by |dx| dcos + slope |d dcos|: dcos (es + et + slope es).
    dcos = 2 * (inv_s[:, :, None] * inv_s[:, None, :]
                + np.abs(cs) * (inv_s[:, :, None] ** 2 + inv_s[:, None, :] ** 2))
    contrib = np.where(keep, slope * dcos, 0.0)                                  # [j, i, k]
    own = np.where(keep, dcos * (es + et + slope * es), 0.0)
    # g_ab enters exactly the triplets holding both a and b (at most 6n of them): sqrt(6n)
    # times the sum of their |contributions|, plus the sum of their own errors
    idx = np.arange(n)
    member = ((idx[:, None, None, None] == idx[None, :, None, None])
              | (idx[:, None, None, None] == idx[None, None, :, None])
              | (idx[:, None, None, None] == idx[None, None, None, :])).reshape(n, -1)
    through = lambda per: (member * per.reshape(1, -1)) @ member.T.astype(np.float64)  # noqa
    grad = math.sqrt(6 * n) * through(contrib) + through(own)
    return float(value), grad


@pytest.mark.parametrize("n,offset,n_vertices,block", [(7, 0, 7, 3), (12, 4, 5, 2),
                                                      (40, 0, 40, 3), (37, 10, 20, None)])
def test_rkd_angle_sum_fused_derivatives_match_autodiff(n, offset, n_vertices, block):
    """Value, reverse- and forward-mode derivatives of the fused pass against autodiff of the
    dense form, on non-symmetric Gram-like inputs (N=37, 40 exercise padded row blocks of 32)."""
    rng = np.random.default_rng(n)
    e_s, e_t = rng.standard_normal((n, 6)), rng.standard_normal((n, 5))
    gs = jnp.asarray(e_s @ e_s.T + 0.01 * rng.standard_normal((n, n)), jnp.float32)
    gt = jnp.asarray(e_t @ e_t.T, jnp.float32)
    block = _relational.angle_block_size(n, n_vertices, block)
    fused = jax.jit(lambda g: _relational.rkd_angle_sum(g, gt, offset, n_vertices, block))
    dense = jax.jit(lambda g: _angle_sum_autodiff(g, gt, offset, n_vertices))
    # float32 vs float32 (tiled fused pass vs dense autodiff): both err, terms=2 times the
    # bounds (eps-units) of _gram_angle_bounds, value and per gradient entry
    value_bound, grad_bound = _gram_angle_bounds(np.asarray(gs, np.float64),
                                                 np.asarray(gt, np.float64), offset, n_vertices)
    assert_close(fused(gs), dense(gs), terms=2, scale=value_bound)
    g_dense = jax.grad(dense)(gs)
    assert_close(jax.grad(fused)(gs), g_dense, terms=2, scale=grad_bound)
    tangent = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    _, jvp_fused = jax.jvp(fused, (gs,), (tangent,))
    _, jvp_dense = jax.jvp(dense, (gs,), (tangent,))
    # the tangent contracted with the gradient: the n^2-term sum (sqrt growth) of
    # |g_ab tangent_ab|, plus each entry's own bound times |tangent_ab|
    tan = np.abs(np.asarray(tangent, np.float64))
    jvp_bound = (n * np.sum(np.abs(np.asarray(g_dense, np.float64)) * tan)
                 + np.sum(grad_bound * tan))
    assert_close(jvp_fused, jvp_dense, terms=2, scale=float(jvp_bound))
