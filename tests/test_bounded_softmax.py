"""Softmaxes over logits of known bound without the row maximum (kdface/_math.py `logsumexp`,
issue 23 item 5): margin-head logits s·cos θ lie in [-s, s], so the log-sum-exp can be summed
around a constant shift instead of the row maximum, one pass over the [N, C] logits (and, with
the class axis split over chips, one all-reduce) fewer. Checked against a float64 reference, at
the extremes of the bound and at 2 M classes, with the fallback to the maximum where no constant
shift keeps float32 finite."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdface import losses
from kdface._math import logsumexp
from tests._tolerance import assert_close


def _lse64(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def _logits(rows, classes, scale, seed=0):
    cos = np.random.default_rng(seed).uniform(-1.0, 1.0, (rows, classes))
    x = (scale * cos).astype(np.float32)
    x[0] = scale           # every logit at the upper bound
    x[1] = -scale          # every logit at the lower bound
    x[2, :] = -scale
    x[2, 7] = scale        # one large logit among many small ones
    return x


def _primitives(fn, *args):
    # the primitives of the traced program, inside custom derivatives and calls too
    names = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            names.append(e.primitive.name)
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


@pytest.mark.parametrize("classes,scale", [(5000, 64.0), (5000, 80.0), (2_000_000, 64.0)])
def test_the_bounded_sum_equals_the_float64_log_sum_exp(classes, scale):
    x = _logits(4, classes, scale)
    got = np.asarray(logsumexp(jnp.asarray(x), bound=scale))
    # each exp is within an ulp, the sum of C positive terms within (C - 1) eps of its value:
    # a relative error of the sum, an absolute one of its log
    assert_close(got, _lse64(x), terms=classes + 1, scale=1.0)
    assert np.all(np.isfinite(got))
    # no pass for the maximum
    assert "reduce_max" not in _primitives(lambda v: logsumexp(v, bound=scale), x)


def test_without_a_feasible_shift_the_maximum_is_used():
    # bound 85 at 2 M classes: exp(85) x 2e6 overflows float32 whatever the constant shift that
    # also keeps exp(-85 - c) normal; the row maximum is taken, and the result stays finite
    x = np.full((2, 2_000_000), 85.0, np.float32)
    x[1, 1:] = -85.0
    assert "reduce_max" in _primitives(lambda v: logsumexp(v, bound=85.0), x)
    got = np.asarray(logsumexp(jnp.asarray(x), bound=85.0))
    assert_close(got, _lse64(x), terms=2_000_001, scale=1.0)


def test_the_gradient_is_the_softmax():
    x = _logits(4, 3000, 64.0, seed=1)
    got = np.asarray(jax.grad(lambda v: jnp.sum(logsumexp(v, bound=64.0)))(jnp.asarray(x)))
    x64 = x.astype(np.float64)
    want = np.exp(x64 - _lse64(x64)[:, None])
    # exp(x - lse) with lse carrying the sum's relative error: relative to each probability;
    # probabilities below float32's smallest normal number may be flushed to zero (XLA:CPU)
    tiny = float(np.finfo(np.float32).tiny)
    normal = want >= tiny
    assert_close(got[normal], want[normal], terms=3001, scale=want[normal])
    assert np.all(np.abs(got[~normal]) <= tiny)


def test_the_losses_with_a_bound_equal_them_without_one():
    s, tau = 64.0, 4.0
    student = _logits(6, 4000, s, seed=2)
    teacher = _logits(6, 4000, s, seed=3)
    labels = np.arange(6, dtype=np.int32) * 11
    free = losses.soft_prediction_loss(student, teacher, temperature=tau, reduction=None)
    bounded = losses.soft_prediction_loss(student, teacher, temperature=tau, reduction=None,
                                          logit_bound=s)
    # -Σ p_t log p_s: the two log-sum-exps (each within (C + 1) eps) times Σ p_t = 1, plus the
    # sum of C terms |p_t log p_s| <= max|log p_s| <= 2 s / τ + log C
    scale = 2 * s / tau + np.log(4000)
    assert_close(np.asarray(bounded), np.asarray(free), terms=2 * 4001, scale=scale)
    assert "reduce_max" not in _primitives(
        lambda a, b: losses.soft_prediction_loss(a, b, temperature=tau, logit_bound=s),
        student, teacher)
    assert _primitives(lambda a, b: losses.soft_prediction_loss(a, b, temperature=tau),
                       student, teacher).count("reduce_max") == 2
    # Hinton's τ² KL: the same row statistics, τ² times the log-sum-exps' error
    free = losses.hinton_kd_loss(student, teacher, temperature=tau, reduction=None)
    bounded = losses.hinton_kd_loss(student, teacher, temperature=tau, reduction=None,
                                    logit_bound=s)
    assert_close(np.asarray(bounded), np.asarray(free), terms=2 * 4001, scale=tau ** 2 * scale)
    assert "reduce_max" not in _primitives(
        lambda a, b: losses.hinton_kd_loss(a, b, temperature=tau, logit_bound=s),
        student, teacher)
    cos = student / s
    margin = losses.cosface_logits(cos, labels, scale=s, margin=0.35)
    free = losses.softmax_cross_entropy(margin, labels, reduction=None)
    bounded = losses.softmax_cross_entropy(margin, labels, reduction=None, logit_bound=s)
    assert_close(np.asarray(bounded), np.asarray(free), terms=2 * 4001, scale=s)


@pytest.mark.parametrize("bound", [None, 64.0])
def test_the_soft_prediction_gradient_is_the_softmax_difference(bound):
    # d/ds Σ_n H(p_t, p_s) = (p_s - p_t) / τ, row by row (Wang et al. 2019 eq. 3's soft loss)
    s, tau = 64.0, 4.0
    student = _logits(5, 3000, s, seed=4)
    teacher = _logits(5, 3000, s, seed=5)
    got = np.asarray(jax.grad(lambda a: losses.soft_prediction_loss(
        a, jnp.asarray(teacher), temperature=tau, reduction="sum", logit_bound=bound))(
        jnp.asarray(student)))
    zs, zt = student.astype(np.float64) / tau, teacher.astype(np.float64) / tau
    p_s = np.exp(zs - _lse64(zs)[:, None])
    p_t = np.exp(zt - _lse64(zt)[:, None])
    # each probability within the (C + 1) eps relative error of its row sum
    assert_close(got, (p_s - p_t) / tau, terms=3001, scale=(p_s + p_t) / tau + 1e-30)
