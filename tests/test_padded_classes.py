"""A class axis padded beyond the real classes (a margin head split over devices that do not
divide them, issue 23: "pad the class axis to a multiple of the mesh, mask the padded logits out
of the softmax and the margin, never predict a padded class"): every loss over the padded axis,
given ``classes=``, is the loss over the real classes, and the padding gets no gradient and no
prediction, whatever the padding columns hold."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close

from kdface import losses
from kdface.distill import class_logits
from kdface.training._step import same_class_width

N, C, PAD = 6, 13, 3  # 13 classes on 4 devices: 16 columns


def _pair(seed=0):
    """Real cosines [N, C] and the same with PAD columns of cosines larger than any real one
    (the worst padding: unmasked, it would take the softmax's mass and the argmax)."""
    rng = np.random.default_rng(seed)
    cos = jnp.asarray(rng.uniform(-0.9, 0.9, (N, C)), jnp.float32)
    padded = jnp.concatenate([cos, jnp.ones((N, PAD), jnp.float32)], axis=1)
    labels = jnp.asarray(np.r_[C - 1, rng.integers(0, C, N - 1)], jnp.int32)
    return cos, padded, labels


MARGINS = {
    "cosface": lambda c, y, **k: losses.cosface_logits(c, y, **k),
    "arcface": lambda c, y, **k: losses.arcface_logits(c, y, **k),
    "sphereface": lambda c, y, **k: losses.sphereface_logits(
        c, y, feature_norm=jnp.linspace(0.5, 3.0, N), lambda_=5.0, **k),
}


@pytest.mark.parametrize("margin", sorted(MARGINS))
def test_margin_losses_over_a_padded_axis_equal_the_unpadded_ones(margin):
    cos, padded, labels = _pair()
    fn = MARGINS[margin]

    def loss(c, classes=None):
        logits = fn(c, labels, classes=classes)
        return losses.softmax_cross_entropy(logits, labels, logit_bound=64.0
                                            if margin != "sphereface" else None)

    want, want_g = jax.value_and_grad(loss)(cos)
    got, got_g = jax.value_and_grad(loss)(padded, C)
    # the same C exponentials summed (the padding's are exactly 0) in another order; logits up
    # to 64 in magnitude
    assert_close(float(got), float(want), terms=C, scale=64.0)
    assert_close(np.asarray(got_g)[:, :C], np.asarray(want_g), terms=C, scale=64.0 / N)
    np.testing.assert_array_equal(np.asarray(got_g)[:, C:], 0.0)
    logits = fn(padded, labels, classes=C)
    np.testing.assert_array_equal(np.asarray(logits)[:, C:], losses.PADDING_LOGIT)
    assert (np.asarray(jnp.argmax(logits, axis=1)) < C).all()
    # unmasked, the padding would change the loss: the test can fail
    assert abs(float(loss(padded)) - float(want)) > 0.1


@pytest.mark.parametrize("bound", [None, 64.0])
@pytest.mark.parametrize("kd", ["hinton", "soft_prediction"])
def test_soft_losses_over_masked_logits_equal_the_unpadded_ones(kd, bound):
    cos_s, padded_s, _ = _pair(1)
    cos_t, padded_t, _ = _pair(2)
    fn = losses.hinton_kd_loss if kd == "hinton" else losses.soft_prediction_loss

    def loss(s, t, classes=None):
        return fn(class_logits("cosface", 64.0, s, classes),
                  class_logits("cosface", 64.0, t, classes), temperature=4.0,
                  logit_bound=bound)

    want, want_g = jax.value_and_grad(loss)(cos_s, cos_t)
    got, got_g = jax.value_and_grad(loss)(padded_s, padded_t, C)
    assert np.isfinite(float(got))
    # sums over C softened probabilities times logits of up to 64 / 4 = 16 (tau^2 = 16 more
    # for Hinton's)
    scale = 16.0 * (16.0 if kd == "hinton" else 1.0)
    assert_close(float(got), float(want), terms=C, scale=scale)
    assert_close(np.asarray(got_g)[:, :C], np.asarray(want_g), terms=C, scale=scale * 4 / N)
    np.testing.assert_array_equal(np.asarray(got_g)[:, C:], 0.0)


def test_a_padded_network_meets_an_unpadded_one_on_one_class_axis():
    """A softmax-head teacher (never split) against a student whose split head is padded: the
    teacher's logits get PADDING_LOGIT columns, and the Hinton loss is the unpadded one."""
    cos_s, padded_s, _ = _pair(3)
    teacher = jnp.asarray(np.random.default_rng(4).normal(size=(N, C)) * 5, jnp.float32)
    s_out = {"logits": class_logits("cosface", 64.0, padded_s, C)}
    s_out, t_out = same_class_width(s_out, {"logits": teacher})
    assert t_out["logits"].shape == (N, C + PAD)
    np.testing.assert_array_equal(np.asarray(t_out["logits"])[:, C:], losses.PADDING_LOGIT)
    got = losses.hinton_kd_loss(s_out["logits"], t_out["logits"], temperature=4.0)
    want = losses.hinton_kd_loss(64.0 * cos_s, teacher, temperature=4.0)
    assert_close(float(got), float(want), terms=C, scale=16.0 * 16.0)
    same = {"logits": teacher}
    assert same_class_width(same, same) == (same, same)


def test_bad_class_counts_are_refused_in_one_line():
    _, padded, labels = _pair()
    with pytest.raises(ValueError, match=r"classes must lie in \[1, 16\].*got 17"):
        losses.cosface_logits(padded, labels, classes=C + PAD + 1)
    with pytest.raises(TypeError, match="classes must be an int"):
        losses.arcface_logits(padded, labels, classes=13.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 12\)"):
        losses.cosface_logits(padded, labels, classes=12)
    # None or the full width: nothing masked
    np.testing.assert_array_equal(losses.mask_padding_classes(padded, None), padded)
    np.testing.assert_array_equal(losses.mask_padding_classes(padded, C + PAD), padded)
