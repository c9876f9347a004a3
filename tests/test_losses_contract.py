"""The contract every exported loss keeps: jit equals eager, vmap equals a loop of calls, and
bfloat16 inputs give a finite float32 result equal to the float32 computation on the rounded
inputs (losses accumulate in float32) and close to the float32 result.

One parametrized test over every name ``kdface.losses`` exports; a new loss must join CASES or
say in NOT_PLAIN_LOSSES why it is tested elsewhere.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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

# Exported callables that are not plain per-batch losses, with where their contract is tested.
NOT_PLAIN_LOSSES = {
    "sphereface_lambda": "a schedule of the step, not a loss (test_losses_classification)",
    "pwr_loss_sharded": "needs a device axis: jit/shard_map in test_losses_pwr_sharded",
    "mk_mmd_sharded": "needs a device axis: test_losses_sharded",
    "rkd_distance_loss_sharded": "needs a device axis: test_losses_sharded",
    "rkd_angle_loss_sharded": "needs a device axis: test_losses_sharded",
    "darkrank_hard_loss_sharded": "needs a device axis: test_losses_sharded",
    "sharded_relational_loss": "needs a mesh: test_losses_sharded",
}


def _exported_functions():
    return sorted(n for n, v in vars(L).items()
                  if not n.startswith("_") and inspect.isfunction(v))


def test_every_exported_loss_is_covered():
    missing = set(_exported_functions()) - set(CASES) - set(NOT_PLAIN_LOSSES)
    assert not missing, f"add these losses to CASES (or NOT_PLAIN_LOSSES with a reason): {missing}"
    assert not (set(CASES) | set(NOT_PLAIN_LOSSES)) - set(_exported_functions())


def _bf16(x):
    return x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_vmap_bf16(name):
    make, fn = CASES[name]
    args = tuple(jnp.asarray(a) for a in make(1))
    jitted = jax.jit(fn)
    eager = fn(*args)
    np.testing.assert_allclose(jitted(*args), eager, rtol=1e-6, atol=1e-7)

    # vmap over a stack of three problems equals three separate calls
    stacks = [tuple(jnp.asarray(a) for a in make(seed)) for seed in (1, 2, 3)]
    stacked = tuple(jnp.stack(column) for column in zip(*stacks))
    batched = jax.jit(jax.vmap(fn))(*stacked)
    for b, problem in enumerate(stacks):
        np.testing.assert_allclose(batched[b], jitted(*problem), rtol=1e-5, atol=1e-6)

    # bfloat16 in: float32 out, the float32 math on the rounded inputs, near the float32 value
    low = tuple(_bf16(a) for a in args)
    out = jitted(*low)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    rounded = tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in low)
    np.testing.assert_allclose(out, jitted(*rounded), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, eager, rtol=0.05, atol=0.01)
