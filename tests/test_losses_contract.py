"""The contract every exported loss keeps: jit equals eager, vmap equals a loop of calls, and
bfloat16 inputs give a finite float32 result equal to the float32 computation on the rounded
inputs (losses accumulate in float32) and close to the float32 result.

One parametrized test over every name ``kdface.losses`` exports; a new loss must join CASES or
say in NOT_PLAIN_LOSSES why it is tested elsewhere.
"""
from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close
from test_losses_mmd import _terms_scale as _mmd_terms_scale
from test_losses_relational import (_darkrank_terms_scale, _rkd_angle_terms_scale,
                                    _rkd_distance_terms_scale)

import kdface.losses as L

N, D, C = 8, 6, 5
LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)      # two of each: triplets exist


def _normal(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _cos(seed):
    return np.tanh(_normal(seed, N, C))                       # cosines in (-1, 1)


def _pair(seed):
    return _normal(seed, N, D), _normal(seed + 100, N, D)


def _landmarks(seed):
    target = np.random.default_rng(seed).uniform(0, 100, size=(N, 5, 2)).astype(np.float32)
    return target + _normal(seed + 1, N, 5, 2), target


def _labels(seed):
    return np.random.default_rng(seed).permutation(LABELS)


# name -> (inputs(seed) -> tuple of arrays, loss(*inputs) -> array)
CASES = {
    "softmax_cross_entropy": (lambda s: (5 * _cos(s), _labels(s)), L.softmax_cross_entropy),
    "margin_cross_entropy": (lambda s: (5 * _cos(s), _labels(s)), L.margin_cross_entropy),
    "cosface_logits": (lambda s: (_cos(s), _labels(s)),
                       lambda c, y: L.softmax_cross_entropy(L.cosface_logits(c, y), y)),
    "arcface_logits": (lambda s: (_cos(s), _labels(s)),
                       lambda c, y: L.softmax_cross_entropy(L.arcface_logits(c, y), y)),
    "sphereface_logits": (lambda s: (_cos(s), _labels(s)),
                          lambda c, y: L.softmax_cross_entropy(
                              L.sphereface_logits(c, y, lambda_=5.0), y)),
    "hinton_kd_loss": (lambda s: (3 * _normal(s, N, C), 3 * _normal(s + 1, N, C)),
                       lambda a, b: L.hinton_kd_loss(a, b, temperature=4.0)),
    "soft_prediction_loss": (lambda s: (3 * _normal(s, N, C), 3 * _normal(s + 1, N, C)),
                             lambda a, b: L.soft_prediction_loss(a, b, temperature=2.0)),
    "l2_hint_loss": (_pair, L.l2_hint_loss),
    "normalized_l2_loss": (_pair, L.normalized_l2_loss),
    "angular_distillation_loss": (_pair, L.angular_distillation_loss),
    "triplet_loss": (lambda s: (_normal(s, N, D), _labels(s)),
                     lambda e, y: L.triplet_loss(e, y, margin=0.5)),
    "landmark_l2_loss": (_landmarks, L.landmark_l2_loss),
    "nrmse": (_landmarks, L.nrmse),
    "pairwise_scores": (lambda s: (_normal(s, N, D),), L.pairwise_scores),
    "pwr_loss": (_pair, L.pwr_loss),
    "pwr_loss_from_scores": (lambda s: (np.tanh(_normal(s, 28)), np.tanh(_normal(s + 1, 28))),
                             L.pwr_loss_from_scores),
    "mk_mmd": (_pair, L.mk_mmd),
    "rkd_distance_loss": (_pair, L.rkd_distance_loss),
    "rkd_angle_loss": (_pair, L.rkd_angle_loss),
    "darkrank_hard_loss": (_pair, L.darkrank_hard_loss),
}

# ----------------------------------------------------------------------------- error bounds
# name -> (inputs as float64 arrays -> (terms, scale)): the rule's bound of ONE float32
# evaluation (tests/_tolerance.py). The comparisons below are float32 vs float32 in another
# order (jit vs eager, vmap vs one call, a bf16 -> f32 convert fused in), so both sides err and
# they pass 2 x terms. Each derivation is the one of the loss's own test file, summarized.

def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def _ce(logit_bound, extra_terms=0):
    """Cross-entropy of logits |x| <= logit_bound over C classes, mean over N: the row's C-term
    log-sum-exp against max|x| + log C (test_losses_classification), N more for the mean, plus
    the margin head's own roundings."""
    return lambda c, y: (C + N + extra_terms, logit_bound(np.abs(_f64(c)[0]).max()) + math.log(C))


def _soft(factor, tau):
    """tau^2 KL or cross-entropy of soft targets: C-term rows against factor (max|x| / tau +
    log C) (test_losses_logit), N more for the mean."""
    return lambda a, b: (C + N, factor * (max(np.abs(_f64(a)[0]).max(), np.abs(_f64(b)[0]).max())
                                          / tau + math.log(C)))


def _l2_hint(a, b):
    """D positive squares per row, then the N-row mean: scale the value (test_losses_feature)."""
    a, b = _f64(a, b)
    return D + N, float(np.mean(np.sum((a - b) ** 2, 1)))


def _triplet(e, y):
    """All N^3 (at most) triplets' hinges of normalized squared distances (<= 4) plus the
    margin 0.5, after the 2D-term norms and distances (test_losses_metric)."""
    return N ** 3 + 2 * D, 4.0 + 0.5


def _landmark(pred, target):
    """2K = 10 positive squares per image, then the N-image mean: scale the value."""
    p, t = _f64(pred, target)
    return 10 + N, float(np.mean(0.5 * np.sum((p - t) ** 2, (1, 2))))


def _nrmse(pred, target):
    """K = 5 point errors over the eye distance (2-term hypots), the N-image mean; the eye
    distance cancels against coordinates up to max|t|: scale value x (1 + max|t| / d)
    (test_losses_metric)."""
    p, t = _f64(pred, target)
    d = np.hypot(*(t[:, 0] - t[:, 1]).T)
    value = np.mean(np.mean(np.hypot(*(p - t).transpose(2, 0, 1)), 1) / d)
    return 5 + 2 + 2 + N, float(value * (1 + np.abs(t).max() / d.min()))


def _pairs_of_pairs(m):
    """PWR sums over the M^2 pairs of the M pair scores (as test_losses_pwr_fast does), scale
    the value (the rule's default)."""
    return lambda *args: (m * m + 2 * D, None)


BOUNDS = {
    "softmax_cross_entropy": _ce(lambda x: x),
    "margin_cross_entropy": _ce(lambda x: x),
    # s (c - m), s (cos(theta + m)) or s (c - m sin m): logits up to s (1 + m), 4 roundings
    "cosface_logits": _ce(lambda c: 64.0 * (c + 0.35), 2),
    "arcface_logits": _ce(lambda c: 64.0 * (c + 0.5), 4),
    # (lambda c + psi) / (1 + lambda), |psi| <= 1 + 2(m - 1): the Chebyshev recurrence's m^2
    "sphereface_logits": _ce(lambda c: (5.0 * c + 1 + 2 * 3) / 6.0, 16 + 2),
    "hinton_kd_loss": _soft(4.0 ** 2, 4.0),
    "soft_prediction_loss": _soft(1.0, 2.0),
    "l2_hint_loss": _l2_hint,
    # unit-vector terms: the norm's D-term sum then the loss's, scale 4 (the loss's range)
    "normalized_l2_loss": lambda a, b: (2 * D + N, 4.0),
    "angular_distillation_loss": lambda a, b: (2 * D + N, 4.0),
    "triplet_loss": _triplet,
    "landmark_l2_loss": _landmark,
    "nrmse": _nrmse,
    # cosines of normalized rows: the D-term norm then the D-term dot, scale 1
    "pairwise_scores": lambda e: (2 * D, 1.0),
    "pwr_loss": _pairs_of_pairs(N * (N - 1) // 2),
    "pwr_loss_from_scores": _pairs_of_pairs(28),
    "mk_mmd": lambda x, y: _mmd_terms_scale(*_f64(x, y)),
    "rkd_distance_loss": lambda s, t: _rkd_distance_terms_scale(*_f64(s, t)),
    "rkd_angle_loss": lambda s, t: _rkd_angle_terms_scale(*_f64(s, t)),
    "darkrank_hard_loss": lambda s, t: _darkrank_terms_scale(*_f64(s, t)),
}


# Exported callables that are not plain per-batch losses, with where their contract is tested.
NOT_PLAIN_LOSSES = {
    "mask_padding_classes": "a mask on logits, not a loss (test_padded_classes)",
    "sphereface_lambda": "a schedule of the step, not a loss (test_losses_classification)",
    "pwr_loss_sharded": "needs a device axis: jit/shard_map in test_losses_pwr_sharded",
    "mk_mmd_sharded": "needs a device axis: test_losses_sharded",
    "rkd_distance_loss_sharded": "needs a device axis: test_losses_sharded",
    "rkd_angle_loss_sharded": "needs a device axis: test_losses_sharded",
    "darkrank_hard_loss_sharded": "needs a device axis: test_losses_sharded",
    "sharded_relational_loss": "needs a mesh: test_losses_sharded",
    "ekd_loss": "returns (loss, state): jit, bf16 and its state in test_losses_ekd",
    "ekd_batch_thresholds": "EKD's per-batch thresholds, not a loss (test_losses_ekd)",
    "ekd_init_state": "EKD's initial state, not a loss (test_losses_ekd)",
    "adadistill_alpha": "AdaDistill's per-sample weights, not a loss (test_losses_adadistill)",
    "adadistill_centres": "AdaDistill's centre update, not a loss (test_losses_adadistill)",
    "adadistill_centres_sharded": "needs a device axis: shard_map in test_losses_adadistill",
    "normalized_cosines": "AdaDistill's cosines, not a loss (test_losses_adadistill)",
    "adadistill_logits": "returns (logits, centres): test_losses_adadistill",
    "adadistill_loss": "returns (loss, centres): jit, bf16 in test_losses_adadistill",
}


def _exported_functions():
    return sorted(n for n, v in vars(L).items()
                  if not n.startswith("_") and inspect.isfunction(v))


def test_every_exported_loss_is_covered():
    missing = set(_exported_functions()) - set(CASES) - set(NOT_PLAIN_LOSSES)
    assert not missing, f"add these losses to CASES (or NOT_PLAIN_LOSSES with a reason): {missing}"
    assert not (set(CASES) | set(NOT_PLAIN_LOSSES)) - set(_exported_functions())
    assert set(BOUNDS) == set(CASES)


def _bf16(x):
    return x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_vmap_bf16(name):
    make, fn = CASES[name]
    args = tuple(jnp.asarray(a) for a in make(1))
    jitted = jax.jit(fn)
    eager = fn(*args)
    # float32 vs float32 (fused vs op by op): 2 x the terms of BOUNDS[name]
    terms, scale = BOUNDS[name](*args)
    assert_close(jitted(*args), eager, terms=2 * terms, scale=scale)

    # vmap over a stack of three problems equals three separate calls (float32 vs float32
    # of another program: 2 x the terms of each problem's bound)
    stacks = [tuple(jnp.asarray(a) for a in make(seed)) for seed in (1, 2, 3)]
    stacked = tuple(jnp.stack(column) for column in zip(*stacks))
    batched = jax.jit(jax.vmap(fn))(*stacked)
    for b, problem in enumerate(stacks):
        terms, scale = BOUNDS[name](*problem)
        assert_close(batched[b], jitted(*problem), terms=2 * terms, scale=scale)

    # bfloat16 in: float32 out, the float32 math on the rounded inputs, near the float32 value
    low = tuple(_bf16(a) for a in args)
    out = jitted(*low)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    rounded = tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in low)
    # float32 vs float32 of another program (the convert fused in): 2 x the terms
    terms, scale = BOUNDS[name](*rounded)
    assert_close(out, jitted(*rounded), terms=2 * terms, scale=scale)
    # Not a float32 rounding tolerance: the inputs themselves were rounded to bfloat16
    # (relative 2^-9 each), which moves each loss by its condition number times that; this
    # coarse band (5% / 0.01, unchanged) only guards against a wildly wrong bf16 path, the
    # exact claim (float32 math on the rounded inputs) is the assertion above.
    np.testing.assert_allclose(out, eager, rtol=0.05, atol=0.01)
