"""kdface.models._conv.conv_general_dilated: pointwise, depthwise and grouped convolutions whose
CPU gradients are matrix products / per-channel / per-group reductions must equal
``lax.conv_general_dilated`` with the same ``feature_group_count`` in value and in both
gradients, and leave every other convolution to XLA."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from kdface import models
from kdface.models import _conv
from kdface.models._conv import conv_general_dilated
from kdface.models._layers import conv

DN = ("NHWC", "HWIO", "NHWC")


def _reference(x, w, stride, padding, groups):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DN,
                                    feature_group_count=groups)


def _ours(x, w, stride, padding, groups):
    return conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DN,
                        feature_group_count=groups)


def _loss(conv_fn, stride, padding, groups):
    def loss(x, w, cotangent):
        y = conv_fn(x, w, stride, padding, groups)
        return jnp.sum(y.astype(jnp.float32) * cotangent)
    return loss


CASES = [  # (H, W, C, groups, multiplier, K, stride, padding): forms the backbones use
    (9, 9, 4, 4, 1, 3, 1, ((1, 1), (1, 1))),    # MobileFaceNet / MobileNet 3x3, stride 1
    (9, 8, 4, 4, 1, 3, 2, ((1, 1), (1, 1))),    # stride 2 on odd and even sizes
    (8, 8, 3, 3, 2, 3, 2, "SAME"),              # channel multiplier 2, Flax's SAME
    (5, 4, 5, 5, 1, 5, 1, "VALID"),             # GDConv: kernel equals the final map
    (10, 7, 4, 4, 1, 3, 2, ((0, 2), (1, 0))),   # asymmetric explicit padding
    (6, 6, 2, 2, 1, 1, 1, ((0, 0), (0, 0))),    # 1x1 depthwise
    (9, 9, 8, 2, 2, 3, 1, ((1, 1), (1, 1))),    # VarGFaceNet: 4 channels per group, factor 2
    (9, 8, 6, 3, 2, 3, 2, ((1, 1), (1, 1))),    # grouped, stride 2
    (3, 3, 8, 2, 1, 3, 1, "VALID"),             # VarGFaceNet embedding: kernel = final map
    (6, 5, 4, 1, 3, 1, 1, ((0, 0), (0, 0))),    # pointwise 4 -> 3
    (7, 6, 4, 1, 2, 1, 2, "VALID"),             # pointwise, stride 2 (IResNet downsampling)
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_conv_equals_xla_conv_in_value_and_gradients(case, dtype):
    h, w_, c, groups, mult, k, stride, padding = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x = jnp.asarray(rng.normal(size=(3, h, w_, c)), dtype)
    w = jnp.asarray(rng.normal(size=(k, k, c // groups, groups * mult)), dtype)
    want = _reference(x, w, stride, padding, groups)
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    got = jax.jit(_ours, static_argnums=(2, 3, 4))(x, w, stride, padding, groups)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)
    grads_want = jax.grad(_loss(_reference, stride, padding, groups), (0, 1))(x, w, cotangent)
    grads_got = jax.jit(jax.grad(_loss(_ours, stride, padding, groups), (0, 1)))(x, w,
                                                                             cotangent)
    scale = max(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) for g in grads_want)
    for got_g, want_g in zip(grads_got, grads_want):
        assert got_g.dtype == want_g.dtype and got_g.shape == want_g.shape
        np.testing.assert_allclose(np.asarray(got_g, np.float32), np.asarray(want_g, np.float32),
                                   rtol=tol, atol=tol * scale)


def test_weight_gradient_matches_a_numpy_loop():
    # dL/dw[i, j, 0, c] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, c] * g[b, h, w, c]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3, 1, 3)).astype(np.float32)
    stride, pad = 2, ((1, 1), (1, 1))
    g = rng.normal(size=_reference(x, w, stride, pad, 3).shape).astype(np.float32)
    want = np.zeros_like(w)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(3):
        for j in range(3):
            for hh in range(g.shape[1]):
                for ww in range(g.shape[2]):
                    want[i, j, 0] += np.sum(xp[:, stride * hh + i, stride * ww + j] *
                                            g[:, hh, ww], axis=0)
    got = jax.grad(_loss(_ours, stride, pad, 3), 1)(jnp.asarray(x), jnp.asarray(w),
                                                    jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _primitives(closed_jaxpr):
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.append((eqn.primitive.name, eqn.params))
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    walk(inner)
                elif hasattr(value, "eqns"):
                    walk(value)
    walk(closed_jaxpr.jaxpr)
    return names


@pytest.mark.parametrize("groups, in_per_group", [(4, 1), (2, 2)])
def test_forward_trace_keeps_one_convolution_and_training_avoids_the_masked_one(
        groups, in_per_group):
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, in_per_group, 4))
    forward = _primitives(jax.make_jaxpr(lambda x, w: _ours(x, w, 1, "SAME", groups))(x, w))
    convs = [p for name, p in forward if name == "conv_general_dilated"]
    assert len(convs) == 1 and convs[0]["feature_group_count"] == groups
    grad = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(_ours(x, w, 2, "SAME", groups)),
                                   (0, 1)))(x, w)
    convs = [p for name, p in _primitives(grad) if name == "conv_general_dilated"]
    # Depthwise: no convolution at all; grouped: forward and input gradient keep XLA's grouped
    # convolution, and no weight-gradient convolution (batch_group_count > 1) remains.
    if in_per_group == 1:
        assert not convs
    assert convs or in_per_group == 1
    assert all(p["batch_group_count"] == 1 and p["feature_group_count"] == groups
               for p in convs)
    xla = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(_reference(x, w, 2, "SAME", groups)),
                                  (0, 1)))
    assert [p for name, p in _primitives(xla(x, w)) if name == "conv_general_dilated"
            and p["batch_group_count"] == groups]  # the weight gradient this module replaces


@pytest.mark.parametrize("groups, kwargs", [
    (1, {}),                                   # a regular convolution
    (4, {"rhs_dilation": (2, 2)}),             # dilated depthwise
    (2, {"lhs_dilation": (2, 2)}),             # input-dilated (transposed) grouped
])
def test_other_convolutions_are_passed_to_xla_unchanged(groups, kwargs):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 9, 4)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 4 // groups, 4)), jnp.float32)
    pad = ((1, 1), (1, 1))
    ours = jax.make_jaxpr(lambda x, w: jax.grad(lambda x, w: jnp.sum(conv_general_dilated(
        x, w, (1, 1), pad, dimension_numbers=DN, feature_group_count=groups, **kwargs)),
        (0, 1))(x, w))(x, w)
    theirs = jax.make_jaxpr(lambda x, w: jax.grad(lambda x, w: jnp.sum(lax.conv_general_dilated(
        x, w, (1, 1), pad, dimension_numbers=DN, feature_group_count=groups, **kwargs)),
        (0, 1))(x, w))(x, w)
    assert str(ours) == str(theirs)


def test_conv_layer_routes_depthwise_through_grouped_conv_with_nnx_params():
    layer = conv(6, 6, 3, stride=2, groups=6, rngs=nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    assert set(params.keys()) == {"kernel"} and params["kernel"][...].shape == (3, 3, 1, 6)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 6)), jnp.float32)
    want = _reference(x, layer.kernel[...], 2, ((1, 1), (1, 1)), 6)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), rtol=1e-6, atol=1e-6)


SMALL_BACKBONES = {  # every depthwise / grouped layer kind, narrow enough to compile quickly
    "mobilefacenet": dict(stem_channels=8, last_channels=32,
                          stage_specs=(((2, 8, 1, 2),), ((2, 16, 1, 2),), ((2, 16, 1, 2),))),
    "vargfacenet": dict(multiplier=0.25, last_channels=64),
}


@pytest.mark.parametrize("name", sorted(SMALL_BACKBONES))
def test_backbone_gradients_equal_those_of_xla_convolutions(name):
    """A whole backbone: the loss gradient of every parameter is the same whether its depthwise
    convolutions take the fast path or XLA's convolution. Eval mode: train-mode BatchNorm over a
    batch this small normalizes the embedding to +-1 and leaves gradients of rounding size."""
    net = models.create(name, rngs=nnx.Rngs(0), input_size=(32, 32), embedding_size=16,
                        **SMALL_BACKBONES[name])
    net.eval()
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)

    def loss(params, rest):
        return jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x) * cotangent)

    fast = jax.jit(jax.value_and_grad(loss))(params, rest)
    with mock.patch.object(_conv, "_fast_kind", lambda *a: None):
        slow = jax.jit(jax.value_and_grad(loss))(params, rest)
    np.testing.assert_allclose(float(fast[0]), float(slow[0]), rtol=1e-4)
    flat_fast, flat_slow = jax.tree.leaves(fast[1]), jax.tree.leaves(slow[1])
    assert len(flat_fast) == len(flat_slow)
    for a, b in zip(flat_fast, flat_slow):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * scale)
