"""Tests for kdface.losses._logit against float64 NumPy loops over the soft-target formulas."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from _tolerance import assert_close

from kdface.losses import _logit
from kdface.losses import hinton_kd_loss, soft_prediction_loss

N, C = 5, 7


def _logits(seed=0, n=N, c=C):
    rng = np.random.default_rng(seed)
    student = (3 * rng.normal(size=(n, c))).astype(np.float32)
    teacher = (3 * rng.normal(size=(n, c))).astype(np.float32)
    return student, teacher


def ref_softmax(row, tau):
    scaled = [float(v) / tau for v in row]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def ref_kl_times_tau2(student, teacher, tau):
    out = []
    for s_row, t_row in zip(student, teacher):
        p_s, p_t = ref_softmax(s_row, tau), ref_softmax(t_row, tau)
        out.append(tau ** 2 * sum(pt * (math.log(pt) - math.log(ps))
                                  for pt, ps in zip(p_t, p_s)))
    return np.array(out)


def ref_soft_cross_entropy(student, teacher, tau):
    out = []
    for s_row, t_row in zip(student, teacher):
        p_s, p_t = ref_softmax(s_row, tau), ref_softmax(t_row, tau)
        out.append(-sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s)))
    return np.array(out)


def _reduce(values, reduction):
    return {"mean": values.mean(), "sum": values.sum()}.get(reduction, values)


def _row_scale(student, teacher, tau, factor):
    """Magnitude of the terms a row's value is summed from: the scaled logits z = x / tau and the
    row log-sum-exps (<= max|z| + log C); the KL (or cross-entropy) is their difference, which
    cancels to far below them. ``factor``: tau^2 for the KL form, 1 for the cross-entropy."""
    z = np.abs(np.concatenate([student, teacher], 1).astype(np.float64)) / tau
    return factor * (z.max(1) + math.log(student.shape[1]))


def _terms_scale(rows_scale, reduction):
    """The row's C-term sums (C terms); a reduction over the N rows adds N terms and sums (or
    averages) the rows' scales."""
    if reduction in (None, "none"):
        return C, rows_scale
    return C + N, float(rows_scale.sum() if reduction == "sum" else rows_scale.mean())


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", None])
def test_hinton_matches_loop(tau, reduction):
    s, t = _logits(1)
    got = hinton_kd_loss(jnp.asarray(s), jnp.asarray(t), temperature=tau, reduction=reduction)
    terms, scale = _terms_scale(_row_scale(s, t, tau, tau ** 2), reduction)
    # float32 vs the float64 loop; terms and scale from _row_scale / _terms_scale
    assert_close(got, _reduce(ref_kl_times_tau2(s, t, tau), reduction), terms=terms, scale=scale)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_prediction_matches_loop(tau, reduction):
    s, t = _logits(2)
    got = soft_prediction_loss(jnp.asarray(s), jnp.asarray(t), temperature=tau,
                               reduction=reduction)
    terms, scale = _terms_scale(_row_scale(s, t, tau, 1.0), reduction)
    # float32 vs the float64 loop; terms and scale from _row_scale / _terms_scale
    assert_close(got, _reduce(ref_soft_cross_entropy(s, t, tau), reduction), terms=terms,
                 scale=scale)


def test_kl_and_cross_entropy_differ_by_teacher_entropy():
    s, t = _logits(3)
    tau = 4.0
    kl = hinton_kd_loss(jnp.asarray(s), jnp.asarray(t), temperature=tau, reduction=None)
    ce = soft_prediction_loss(jnp.asarray(s), jnp.asarray(t), temperature=tau, reduction=None)
    entropy = np.array([-sum(p * math.log(p) for p in ref_softmax(row, tau)) for row in t])
    # Two float32 values (each within C eps of its row scale) combined, against the float64
    # entropy: 2C terms, scale the cross-entropy's row scale (the KL's divided by tau^2).
    assert_close(np.asarray(ce, np.float64) - np.asarray(kl, np.float64) / tau ** 2, entropy,
                 terms=2 * C, scale=_row_scale(s, t, tau, 1.0))


def test_hinton_zero_for_matching_and_shifted_logits():
    s, _ = _logits(4)
    shifted = s + np.arange(N, dtype=np.float32)[:, None]  # softmax ignores a per-row shift
    for teacher in (s, shifted):
        got = hinton_kd_loss(jnp.asarray(s), jnp.asarray(teacher), temperature=4.0,
                             reduction=None)
        # exact answer 0: the KL's terms (C of them) cancel; scale = tau^2 (max|z| + log C)
        assert_close(got, np.zeros(N), terms=C, scale=_row_scale(s, teacher, 4.0, 16.0))


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_gradients_match_closed_form(tau):
    s, t = _logits(5)

    def probs(x):
        x = np.asarray(x, np.float64) / tau
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    diff = probs(s) - probs(t)
    g_kd, g_teacher = jax.jit(jax.grad(
        lambda a, b: hinton_kd_loss(a, b, temperature=tau, reduction="sum"), argnums=(0, 1)))(
            jnp.asarray(s), jnp.asarray(t))
    # float32 vs float64 closed form: each entry tau (p_s - p_t), the p from a C-term softmax
    # sum; the exp of z - lse carries the lse's absolute error, so the scale is tau times the
    # row scale (max|z| + log C) times the probability, bounded by 1.
    assert_close(g_kd, tau * diff, terms=C, scale=tau * _row_scale(s, t, tau, 1.0)[:, None])
    np.testing.assert_array_equal(g_teacher, np.zeros_like(t))  # teacher is frozen
    g_soft = jax.jit(jax.grad(
        lambda a: soft_prediction_loss(a, jnp.asarray(t), temperature=tau, reduction="sum")))(
            jnp.asarray(s))
    # the same closed form divided by tau^2 (see g_kd)
    assert_close(g_soft, diff / tau, terms=C, scale=_row_scale(s, t, tau, 1.0)[:, None] / tau)


def test_row_blocks_match_whole_rows(monkeypatch):
    """On the CPU the row statistics run over blocks of rows; with 3-row blocks and N = 5 the
    last block overlaps the previous one. Value, per-example values, gradient and vmap must
    equal the closed forms."""
    monkeypatch.setattr(_logit, "SOFT_ROW_BLOCK_ELEMENTS", 3 * C)
    s, t = _logits(10)
    assert s.shape[0] % 3 != 0
    tau = 2.0

    def probs(x):
        x = np.asarray(x, np.float64) / tau
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    ps, pt = probs(s), probs(t)
    want = tau**2 * np.sum(pt * (np.log(pt) - np.log(ps)), axis=1)
    f = jax.jit(lambda a, b, r: hinton_kd_loss(a, b, temperature=tau, reduction=r),
                static_argnums=2)
    rows_scale = _row_scale(s, t, tau, tau ** 2)
    # float32 vs the float64 closed form, per row (see _row_scale): C terms
    assert_close(f(jnp.asarray(s), jnp.asarray(t), None), want, terms=C, scale=rows_scale)
    grad = jax.jit(jax.grad(lambda a: hinton_kd_loss(a, jnp.asarray(t), temperature=tau)))(
        jnp.asarray(s))
    # as in test_gradients_match_closed_form, with the mean's 1/N
    assert_close(grad, tau * (ps - pt) / s.shape[0], terms=C,
                 scale=tau * _row_scale(s, t, tau, 1.0)[:, None] / s.shape[0])
    batched = jax.jit(jax.vmap(lambda a, b: hinton_kd_loss(a, b, temperature=tau)))(
        jnp.stack([jnp.asarray(s), jnp.asarray(t)]), jnp.stack([jnp.asarray(t), jnp.asarray(s)]))
    # the mean over N rows of the per-row values: C + N terms, the rows' mean scale
    assert_close(batched[0], np.mean(want), terms=C + N, scale=float(rows_scale.mean()))
    # the soft-prediction cross-entropy runs on the same blocked row statistics
    cross = -np.sum(pt * np.log(ps), axis=1)
    got = jax.jit(lambda a, b: soft_prediction_loss(a, b, temperature=tau, reduction=None))(
        jnp.asarray(s), jnp.asarray(t))
    assert_close(got, cross, terms=C, scale=_row_scale(s, t, tau, 1.0))
    grad = jax.jit(jax.grad(lambda a: soft_prediction_loss(a, jnp.asarray(t), temperature=tau)))(
        jnp.asarray(s))
    assert_close(grad, (ps - pt) / tau / s.shape[0], terms=C,
                 scale=_row_scale(s, t, tau, 1.0)[:, None] / tau / s.shape[0])


def test_check_grads_float64():
    s, t = _logits(6)
    with jax.enable_x64(True):
        s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
        check_grads(jax.jit(lambda a: hinton_kd_loss(a, t64, temperature=4.0)), (s64,), order=1,
                    modes=["rev", "fwd"])
        check_grads(jax.jit(lambda a: soft_prediction_loss(a, t64, temperature=2.0)), (s64,),
                    order=1, modes=["rev", "fwd"])


def test_bad_inputs():
    s, t = _logits(9)
    s, t = jnp.asarray(s), jnp.asarray(t)
    with pytest.raises(ValueError, match="same shape"):
        hinton_kd_loss(s, t[:, :-1], temperature=4.0)
    with pytest.raises(ValueError, match="same shape"):
        soft_prediction_loss(s, t[:-1], temperature=4.0)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        hinton_kd_loss(s[0], t[0], temperature=4.0)
    with pytest.raises(ValueError, match="temperature"):
        hinton_kd_loss(s, t, temperature=0.0)
    with pytest.raises(TypeError, match="floating"):
        hinton_kd_loss(s.astype(jnp.int32), t, temperature=1.0)
    with pytest.raises(ValueError, match="reduction"):
        soft_prediction_loss(s, t, temperature=1.0, reduction="batchmean")
    with pytest.raises(TypeError):
        hinton_kd_loss(s, t)  # temperature has no default: the papers' values differ
