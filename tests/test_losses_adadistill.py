"""AdaDistill (Boutros et al. 2024) against float64 NumPy loops over the paper's equations with
the official code's clamps: the adaptive weight, the centre update (duplicate labels: last in
batch order wins, every candidate from the pre-step centre), the margin logits and the loss."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from _tolerance import assert_close

from kdface.losses import (adadistill_alpha, adadistill_centres, adadistill_centres_sharded,
                           adadistill_logits, adadistill_loss, arcface_logits, cosface_logits,
                           normalized_cosines, softmax_cross_entropy)

N, E, C = 10, 8, 7
MARGINS = {"arcface": 0.45, "cosface": 0.35}


# ----------------------------------------------------------------------------- reference

def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def ref_alpha(centres, s, t, labels):
    out = []
    for i, y in enumerate(labels):
        su, tu = _unit(s[i]), _unit(t[i])
        lam = min(max(float(_unit(centres[:, y]) @ tu), 1e-6), 1.0)
        cos_st = min(max(float(su @ tu), -1.0), 1.0)
        out.append(min(max(cos_st * lam, 1e-6), 1.0))
    return np.array(out)


def ref_centres(centres, s, t, labels):
    """c_y <- alpha c_y + (1 - alpha) t/|t| for each sample in batch order, alpha and c_y read
    from the pre-step centres; a later sample of the same label overwrites an earlier one."""
    old = np.asarray(centres, np.float64)
    new = old.copy()
    alpha = ref_alpha(old, s, t, labels)
    for i, y in enumerate(labels):
        new[:, y] = alpha[i] * old[:, y] + (1.0 - alpha[i]) * _unit(t[i])
    return new


def ref_logits(s, t, labels, centres, head, scale=64.0, margin=None):
    """The official header: cos of unit rows and unit centre columns, clamped; ArcFace
    s cos(acos(c) + m) on the target (no fallback: test inputs keep acos(c) + m < pi), CosFace
    s (c - m)."""
    m = MARGINS[head] if margin is None else margin
    new = ref_centres(centres, s, t, labels)
    cols = new / np.linalg.norm(new, axis=0, keepdims=True)
    out = np.zeros((len(labels), new.shape[1]))
    for i, y in enumerate(labels):
        su = _unit(s[i])
        for j in range(new.shape[1]):
            c = min(max(float(su @ cols[:, j]), -1.0), 1.0)
            if j == y:
                assert math.acos(c) + m < math.pi
                c = math.cos(math.acos(c) + m) if head == "arcface" else c - m
            out[i, j] = scale * c
    return out, new


def ref_loss(s, t, labels, centres, head, **options):
    logits, new = ref_logits(s, t, labels, centres, head, **options)
    per = [np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[y]
           for row, y in zip(logits, labels)]
    return float(np.mean(per)), new


def _data(seed, n=N, labels=None, centre_std=0.01):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n, E)).astype(np.float32)
    s = (0.8 * t + 0.6 * rng.normal(size=(n, E))).astype(np.float32)
    centres = (centre_std * rng.normal(size=(E, C))).astype(np.float32)
    if labels is None:
        labels = rng.integers(0, C, n)                 # N > C: duplicates are certain
    return centres, s, t, np.asarray(labels, np.int32)


# float32 bounds (tests/_tolerance.py). alpha: two E-term cosines after E-term norms (4E
# terms, scale 1). A new column alpha c + (1 - alpha) t: alpha's error times |c - t|, plus
# three roundings: 4E + 3 terms of scale |c| + 1. The logits: an E-term cosine of unit rows and
# the E-term column norm of a column that carries the update's error, then the margin's 4
# roundings (test_losses_classification): 6E + 7 terms of scale s (1 + m).
def _centre_bound(centres):
    return 4 * E + 3, np.abs(np.asarray(centres, np.float64)) + 1.0


LOGIT_TERMS = 6 * E + 7


@functools.lru_cache(maxsize=None)
def _jitted(fn, **options):
    return jax.jit(functools.partial(fn, **options))


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_and_centres_match_reference(seed):
    centres, s, t, labels = _data(seed, centre_std=0.01 if seed else 1.0)
    alpha = _jitted(adadistill_alpha)(centres, s, t, labels)
    assert_close(alpha, ref_alpha(centres, s, t, labels), terms=4 * E, scale=1.0)
    got = _jitted(adadistill_centres)(centres, s, t, labels)
    want = ref_centres(centres, s, t, labels)
    terms, scale = _centre_bound(want)
    assert_close(got, want, terms=terms, scale=scale)
    # classes outside the batch keep their centres bit for bit
    untouched = np.setdiff1d(np.arange(C), labels)
    np.testing.assert_array_equal(np.asarray(got)[:, untouched], centres[:, untouched])


def test_normalized_cosines_match_reference():
    centres, s, _, _ = _data(4)
    centres[:, -1] = 0.0  # a padding column: cos 0, not NaN
    got = np.asarray(_jitted(normalized_cosines)(s, centres))
    norms = np.linalg.norm(np.asarray(centres, np.float64), axis=0)
    want = (s / np.linalg.norm(s, axis=1, keepdims=True)) @ (
        centres / np.where(norms > 0, norms, 1.0))
    assert_close(got, np.clip(want, -1, 1), terms=3 * E, scale=1.0)
    np.testing.assert_array_equal(got[:, -1], 0.0)


@pytest.mark.shards
def test_the_shard_local_update_equals_the_replicated_one():
    """Columns split over every device, each writing only its own: bit for bit the replicated
    update, duplicate labels (last in batch order) and classes outside the batch included."""
    from jax.sharding import PartitionSpec as P
    devices = jax.device_count()
    classes = 2 * devices
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(E, classes)).astype(np.float32)
    s = rng.normal(size=(N, E)).astype(np.float32)
    t = (s + rng.normal(size=(N, E))).astype(np.float32)
    labels = rng.integers(0, classes, N).astype(np.int32)
    labels[3] = labels[7] = labels[0]
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    update = jax.jit(jax.shard_map(functools.partial(adadistill_centres_sharded,
                                                     axis_name="data"),
                                   mesh=mesh, in_specs=(P(None, "data"), P(), P(), P()),
                                   out_specs=P(None, "data")))
    np.testing.assert_array_equal(np.asarray(update(centres, s, t, labels)),
                                  np.asarray(_jitted(adadistill_centres)(centres, s, t, labels)))


def test_duplicate_labels_last_in_batch_order_wins():
    centres, s, t, _ = _data(3)
    labels = np.array([2, 5, 2, 2, 0, 5, 1, 3, 2, 4], np.int32)
    got = np.asarray(_jitted(adadistill_centres)(centres, s, t, labels))
    alpha = ref_alpha(centres, s, t, labels)
    for y in (2, 5):
        last = np.flatnonzero(labels == y)[-1]
        # the last sample's candidate, from the pre-step centre (not chained, not averaged)
        want = alpha[last] * centres[:, y] + (1 - alpha[last]) * _unit(t[last])
        terms, scale = _centre_bound(want)
        assert_close(got[:, y], want, terms=terms, scale=scale)
        first = np.flatnonzero(labels == y)[0]
        other = alpha[first] * centres[:, y] + (1 - alpha[first]) * _unit(t[first])
        assert np.max(np.abs(got[:, y] - other)) > 1e-3
    # deterministic: the same call twice, and under another batch order of the others
    again = np.asarray(_jitted(adadistill_centres)(centres, s, t, labels))
    np.testing.assert_array_equal(got, again)


def test_alpha_clamps():
    centres, s, t, labels = _data(4, n=4, labels=[0, 1, 2, 3])
    s[0] = -t[0]                        # cos(s, t) = -1: alpha clamps to 1e-6
    centres[:, 1] = -t[1]               # cos(c, t) = -1: lambda clamps to 1e-6
    s[2] = t[2]
    centres[:, 2] = 3.0 * t[2]          # cos(s, t) = cos(c, t) = 1: alpha = 1, centre kept
    s[3] = -t[3]
    centres[:, 3] = -t[3]               # both -1: lambda's clamp makes alpha 1e-6, not (-1)(-1)
    alpha = np.asarray(adadistill_alpha(centres, s, t, labels))
    floor = np.float32(1e-6)
    assert alpha[0] == floor
    # lambda = 1e-6 times cos(s, t) < 1: below the floor, so the floor (2E-term cosine)
    assert_close(alpha[1], floor, terms=2 * E, scale=1e-6)
    assert_close(alpha[2], 1.0, terms=4 * E, scale=1.0)
    assert alpha[3] == floor
    new = np.asarray(adadistill_centres(centres, s, t, labels))
    terms, scale = _centre_bound(centres)
    assert_close(new[:, 0], (1 - 1e-6) * _unit(t[0]) + 1e-6 * centres[:, 0], terms=terms,
                 scale=scale[:, 0])
    # alpha = 1 up to 4E eps: the centre moves by that much of |c - t|
    assert_close(new[:, 2], centres[:, 2], terms=terms, scale=scale[:, 2] * 3.0)


@pytest.mark.parametrize("head", ["arcface", "cosface"])
def test_logits_and_loss_match_reference(head):
    centres, s, t, labels = _data(5)
    logits, new = _jitted(adadistill_logits, head=head)(s, t, labels, centres)
    want, want_new = ref_logits(s, t, labels, centres, head)
    m = MARGINS[head]
    assert_close(logits, want, terms=LOGIT_TERMS, scale=64.0 * (1.0 + m))
    terms, scale = _centre_bound(want_new)
    assert_close(new, want_new, terms=terms, scale=scale)
    loss, _ = _jitted(adadistill_loss, head=head)(s, t, labels, centres)
    want_loss, _ = ref_loss(s, t, labels, centres, head)
    # the logits' bound, then the C-term log-sum-exp and the N-row mean (scale: logit bound
    # plus log C, test_losses_classification)
    assert_close(loss, want_loss, terms=LOGIT_TERMS + C + N, scale=64.0 * (1.0 + m) + math.log(C))


def test_options_scale_margin_and_reduction():
    centres, s, t, labels = _data(6)
    got = adadistill_loss(s, t, labels, centres, head="cosface", scale=30.0, margin=0.2,
                          reduction=None)[0]
    logits, _ = ref_logits(s, t, labels, centres, "cosface", scale=30.0, margin=0.2)
    want = [np.log(np.sum(np.exp(r - r.max()))) + r.max() - r[y] for r, y in zip(logits, labels)]
    assert got.shape == (N,)
    assert_close(got, np.array(want), terms=LOGIT_TERMS + C, scale=30.0 * 1.2 + math.log(C))


def test_centres_in_marginhead_layout():
    from flax import nnx

    from kdface.models._heads import MarginHead
    head = MarginHead(E, C, rngs=nnx.Rngs(0))
    _, s, t, labels = _data(7)
    weight = head.weight[...]
    logits, new = adadistill_logits(s, t, labels, weight, head="cosface", scale=1.0, margin=0.0)
    assert new.shape == weight.shape == (E, C)
    head.weight[...] = new
    # the same cosines as the head with the updated weight: an E-term product and norm
    assert_close(logits, head(jnp.asarray(s)), terms=2 * E, scale=1.0)


# ----------------------------------------------------------------------------- gradients, jit

def test_gradient_is_the_fixed_centre_margin_loss_gradient():
    # The update carries no gradient: the loss's gradient is that of the margin loss against
    # the updated centres held constant, itself checked against finite differences.
    centres, s, t, labels = _data(8)
    with jax.enable_x64(True):
        c64, s64, t64 = (jnp.asarray(a, jnp.float64) for a in (centres, s, t))
        y = jnp.asarray(labels)
        new = adadistill_centres(c64, s64, t64, y)
        cols = new / jnp.linalg.norm(new, axis=0, keepdims=True)

        def fixed(x):
            cos = (x / jnp.linalg.norm(x, axis=1, keepdims=True)) @ cols
            return softmax_cross_entropy(arcface_logits(cos, y, margin=0.45), y)

        check_grads(jax.jit(fixed), (s64,), order=1, modes=["rev"])
        got = jax.grad(lambda x: adadistill_loss(x, t64, y, c64)[0])(s64)
        want = jax.grad(fixed)(s64)
    # float64 vs float64 in another order: the E-term product and norms, the C-term softmax;
    # scale the gradient's size (s (1 + m) per unit of the normalization's Jacobian)
    assert_close(got, want, terms=2 * E + C, scale=64.0 * 1.45, dtype=np.float64)


def test_no_gradient_to_teacher_or_centres():
    centres, s, t, labels = _data(9)
    g_t, g_c = jax.grad(lambda t, c: adadistill_loss(s, t, labels, c)[0], argnums=(0, 1))(
        jnp.asarray(t), jnp.asarray(centres))
    np.testing.assert_array_equal(g_t, np.zeros_like(t))
    np.testing.assert_array_equal(g_c, np.zeros_like(centres))


def test_jit_equals_eager_and_bf16():
    centres, s, t, labels = _data(10)
    eager, eager_c = adadistill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(labels),
                                     jnp.asarray(centres))
    jitted, jitted_c = _jitted(adadistill_loss)(s, t, labels, centres)
    m = MARGINS["arcface"]
    # float32 vs float32 in another order: both err, 2 x the terms
    assert_close(jitted, eager, terms=2 * (LOGIT_TERMS + C + N), scale=64.0 * (1 + m) + 2.0)
    terms, scale = _centre_bound(eager_c)
    assert_close(jitted_c, eager_c, terms=2 * terms, scale=scale)
    low, low_c = _jitted(adadistill_loss)(jnp.asarray(s, jnp.bfloat16),
                                          jnp.asarray(t, jnp.bfloat16), labels, centres)
    assert low.dtype == jnp.float32 and np.isfinite(float(low))
    assert low_c.dtype == jnp.float32                         # the centres keep their dtype


# ----------------------------------------------------------------------------- checks

def test_argument_checks():
    centres, s, t, labels = _data(11)
    with pytest.raises(ValueError, match=r"\[E, C\]"):
        adadistill_centres(centres[0], s, t, labels)
    with pytest.raises(ValueError, match="share E"):
        adadistill_centres(centres[:5], s, t, labels)
    with pytest.raises(ValueError, match="same shape"):
        adadistill_centres(centres, s, t[:, :5], labels)
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        adadistill_centres(centres, s, t, labels + C)
    with pytest.raises(TypeError, match="integer"):
        adadistill_centres(centres, s, t, labels.astype(np.float32))
    with pytest.raises(TypeError, match="floating"):
        adadistill_centres(centres.astype(np.int32), s, t, labels)
    with pytest.raises(ValueError, match="head"):
        adadistill_logits(s, t, labels, centres, head="sphereface")
    with pytest.raises(ValueError, match="scale"):
        adadistill_logits(s, t, labels, centres, scale=0.0)
    with pytest.raises(ValueError, match="reduction"):
        adadistill_loss(s, t, labels, centres, reduction="max")
    # cosface_logits is the same margin function the head uses
    assert callable(cosface_logits)
