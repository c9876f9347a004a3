"""RKD-D, RKD-A, DarkRank-hard against plain float64 NumPy loops over the papers' formulas."""
from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d_s)) * scale, rng.normal(size=(n, d_t)) * scale


def _f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


# ------------------------------------------------------------------------------ RKD-D

@pytest.mark.parametrize("n", [4, 9])
@pytest.mark.parametrize("reduction", ["mean", "sum", None])
def test_rkd_distance_matches_loop(n, reduction):
    s, t = _pair(n, seed=n)
    got = jitted(rkd_distance_loss, reduction=reduction)(*_f32(s, t))
    np.testing.assert_allclose(got, ref_rkd_distance(s, t, reduction), rtol=1e-5, atol=1e-7)


def test_rkd_distance_zero_for_equal_and_scale_invariant():
    s, t = _pair(8)
    s32, t32 = _f32(s, t)
    loss = jitted(rkd_distance_loss)
    assert float(loss(s32, s32)) == pytest.approx(0.0, abs=1e-7)
    base = loss(s32, t32)
    np.testing.assert_allclose(loss(3.7 * s32, t32), base, rtol=1e-5)
    np.testing.assert_allclose(loss(s32 + 5.0, 0.1 * t32), base, rtol=1e-5)


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
    np.testing.assert_allclose(float(value), ref_rkd_distance(s, t), rtol=1e-5, atol=1e-7)
    if side == "teacher":   # the student is still pulled together, by its exact gradient
        want = numerical_grad(lambda x: ref_rkd_distance(x, t), s)
        np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-5)


def test_rkd_distance_gradient_matches_numpy():
    s, t = _pair(6)
    got = jax.jit(jax.grad(rkd_distance_loss))(*_f32(s, t))
    want = numerical_grad(lambda x: ref_rkd_distance(x, t), s)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------ RKD-A

@pytest.mark.parametrize("n,block_size", [(4, None), (7, 1), (7, 3), (12, 5), (12, None)])
def test_rkd_angle_matches_loop(n, block_size):
    s, t = _pair(n, seed=n)
    got = jitted(rkd_angle_loss, block_size=block_size)(*_f32(s, t))
    np.testing.assert_allclose(got, ref_rkd_angle(s, t), rtol=1e-5)


def test_rkd_angle_zero_for_equal_and_similarity_invariant():
    s, t = _pair(8)
    s32, t32 = _f32(s, t)
    loss = jitted(rkd_angle_loss)
    assert float(loss(s32, s32)) == pytest.approx(0.0, abs=1e-7)
    base = loss(s32, t32)
    np.testing.assert_allclose(loss(2.5 * s32 - 1.0, t32), base, rtol=1e-5)


def test_rkd_angle_gradient_matches_numpy():
    s, t = _pair(5)
    got = jax.jit(jax.grad(jitted(rkd_angle_loss, block_size=2)))(*_f32(s, t))
    want = numerical_grad(lambda x: ref_rkd_angle(x, t), s)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


def test_rkd_angle_duplicate_points_give_zero_direction_and_finite_grad():
    s, t = _pair(6)
    s[3] = s[1]  # Park et al.: F.normalize(0) = 0, so the angle at a duplicate is cos 0
    s32, t32 = _f32(s, t)
    value, grad = jax.jit(jax.value_and_grad(rkd_angle_loss))(s32, t32)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, ref_rkd_angle(s, t), rtol=1e-5)


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
    np.testing.assert_allclose(park, (n * (n - 1) * (n - 2) * got + 0.5 * n_one_sided) / n**3,
                               rtol=1e-5)
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
    np.testing.assert_allclose(got, ref_darkrank(s, t, alpha, beta, list_length), rtol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", None])
def test_darkrank_reductions(reduction):
    s, t = _pair(7, scale=0.5)
    got = jitted(darkrank_hard_loss, reduction=reduction)(*_f32(s, t))
    np.testing.assert_allclose(got, ref_darkrank(s, t, reduction=reduction), rtol=1e-5)


def test_darkrank_stable_for_large_scores():
    s, t = _pair(8, scale=20.0)  # scores ~ -3 * 60^3: a naive exp underflows to log(0)
    value, grad = jax.jit(jax.value_and_grad(darkrank_hard_loss))(*_f32(s, t))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, ref_darkrank(s, t), rtol=1e-5)


def test_darkrank_gradient_matches_numpy():
    s, t = _pair(6, scale=0.5)
    got = jax.jit(jax.grad(darkrank_hard_loss))(*_f32(s, t))
    want = numerical_grad(lambda x: ref_darkrank(x, t), s)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


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
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(g1)))
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-5)


def test_darkrank_vmap_and_value_only_call():
    s, t = _pair(7, scale=0.5)
    s2, t2 = _pair(7, scale=0.7, seed=1)
    stacked = jax.jit(jax.vmap(darkrank_hard_loss))(*_f32(np.stack([s, s2]), np.stack([t, t2])))
    np.testing.assert_allclose(stacked, [ref_darkrank(s, t), ref_darkrank(s2, t2)], rtol=1e-5)


def test_darkrank_prefers_teacher_order():
    """A student that reproduces the teacher's geometry beats one with a shuffled geometry."""
    s, t = _pair(10, d_s=3, d_t=3, scale=0.5)
    t32, s32 = _f32(t, s)
    loss = jitted(darkrank_hard_loss)
    assert float(loss(t32, t32)) < float(loss(s32, t32))


# ------------------------------------------------------------------------------ all three

LOSSES = [rkd_distance_loss, rkd_angle_loss, darkrank_hard_loss]


@pytest.mark.parametrize("loss", LOSSES)
def test_jit_equals_eager_and_teacher_is_constant(loss):
    s, t = _f32(*_pair(8, scale=0.5))
    np.testing.assert_allclose(jax.jit(loss)(s, t), loss(s, t), rtol=1e-6)
    grad_teacher = jax.grad(loss, argnums=1)(s, t)
    assert np.all(np.asarray(grad_teacher) == 0.0)


@pytest.mark.parametrize("loss", LOSSES)
def test_bfloat16_inputs_compute_in_float32(loss):
    s, t = _pair(8, scale=0.5)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    got = jax.jit(loss)(s16, t16)
    assert got.dtype == jnp.float32
    want = jax.jit(loss)(s16.astype(jnp.float32), t16.astype(jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-6)
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
    np.testing.assert_allclose(fused(gs), dense(gs), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(fused)(gs), jax.grad(dense)(gs), rtol=2e-4, atol=2e-6)
    tangent = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    _, jvp_fused = jax.jvp(fused, (gs,), (tangent,))
    _, jvp_dense = jax.jvp(dense, (gs,), (tangent,))
    np.testing.assert_allclose(jvp_fused, jvp_dense, rtol=2e-4)
