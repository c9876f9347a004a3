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

from _tolerance import assert_close

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


def _reference64(x, w, cotangent, stride, padding, groups):
    """XLA's convolution in float64 (exact inputs: float32 and bfloat16 values are float64
    values), its two gradients for the loss sum(y * cotangent), and per element the magnitude
    of the terms each one sums: the same three with |x|, |w|, |cotangent|."""
    with jax.enable_x64(True):
        x, w, cotangent = (jnp.asarray(np.asarray(a, np.float64)) for a in (x, w, cotangent))
        out = []
        for args in ((x, w, cotangent), (jnp.abs(x), jnp.abs(w), jnp.abs(cotangent))):
            y = _reference(*args[:2], stride, padding, groups)
            g = jax.grad(lambda x, w: jnp.sum(_reference(x, w, stride, padding, groups) *
                                              args[2]), (0, 1))(*args[:2])
            out.append([np.asarray(a) for a in (y, *g)])
    return out


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
    rng = np.random.default_rng(CASES.index(case))   # hash() of a str varies per process
    x = jnp.asarray(rng.normal(size=(3, h, w_, c)), dtype)
    w = jnp.asarray(rng.normal(size=(k, k, c // groups, groups * mult)), dtype)
    cotangent = jnp.asarray(rng.normal(size=_reference(x, w, stride, padding, groups).shape),
                            jnp.float32)
    want, scale = _reference64(x, w, cotangent, stride, padding, groups)
    got = jax.jit(_ours, static_argnums=(2, 3, 4))(x, w, stride, padding, groups)
    assert got.shape == want[0].shape and got.dtype == x.dtype
    grads = jax.jit(jax.grad(_loss(_ours, stride, padding, groups), (0, 1)))(x, w, cotangent)
    # vs float64 (case 2), each element against its own terms' magnitude (sum |x||w|, ...);
    # terms: y sums k*k*C_in/groups products, dx k*k*multiplier (the output channels of its
    # group), dw batch x output positions. eps of `dtype`: bfloat16 results are rounded to it.
    out_positions = want[0].shape[0] * want[0].shape[1] * want[0].shape[2]
    for name, a, n in [("y", got, k * k * (c // groups)), ("dx", grads[0], k * k * mult),
                       ("dw", grads[1], out_positions)]:
        assert a.dtype == x.dtype
        j = ("y", "dx", "dw").index(name)
        assert_close(np.asarray(a, np.float32), want[j], terms=max(n, 1), scale=scale[j],
                     dtype=dtype,
                     what=f"{name}: ")


def test_weight_gradient_matches_a_numpy_loop():
    # dL/dw[i, j, 0, c] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, c] * g[b, h, w, c]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3, 1, 3)).astype(np.float32)
    stride, pad = 2, ((1, 1), (1, 1))
    g = rng.normal(size=_reference(x, w, stride, pad, 3).shape).astype(np.float32)
    want, scale = np.zeros(w.shape), np.zeros(w.shape)         # float64 loop (case 2)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
    for i in range(3):
        for j in range(3):
            for hh in range(g.shape[1]):
                for ww in range(g.shape[2]):
                    terms = xp[:, stride * hh + i, stride * ww + j] * g[:, hh, ww]
                    want[i, j, 0] += np.sum(terms, axis=0)
                    scale[i, j, 0] += np.sum(np.abs(terms), axis=0)
    got = jax.grad(_loss(_ours, stride, pad, 3), 1)(jnp.asarray(x), jnp.asarray(w),
                                                    jnp.asarray(g))
    # each dw element sums batch x output positions products; scale: its sum of |products|
    assert_close(np.asarray(got), want, terms=g.shape[0] * g.shape[1] * g.shape[2], scale=scale)


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
    cotangent = np.zeros(layer(x).shape, np.float32)
    (want, *_), (scale, *_) = _reference64(x, layer.kernel[...], cotangent, 2,
                                           ((1, 1), (1, 1)), 6)
    # vs float64 (case 2): a depthwise 3x3 sums 9 products; scale: each element's sum |x||w|
    assert_close(np.asarray(layer(x)), want, terms=9, scale=scale)


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
    # fast vs XLA path: float32 vs float32 in another order (case 3/4). terms: 2 x (the forward
    # path's reductions, the backward path's, and the longest weight-gradient reduction, the
    # stem's batch x 16x16 positions); scale: per leaf max|slow|, the loss's own for the value.
    kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(params)
               if "kernel" in jax.tree_util.keystr(p) and v.ndim >= 2]
    path = int(sum(np.prod(k.shape[:-1]) for k in kernels))
    terms = 2 * (2 * path + x.shape[0] * (x.shape[1] // 2) * (x.shape[2] // 2))
    assert_close(float(fast[0]), float(slow[0]), terms=2 * path, what="loss: ")
    flat_fast, flat_slow = jax.tree.leaves(fast[1]), jax.tree.leaves(slow[1])
    assert len(flat_fast) == len(flat_slow)
    # measured (CPU, AVX-512): at most 75 eps x max|leaf| for vargfacenet, whose terms are ~24k;
    # the sqrt growth (154) would leave only 2x, so this keeps the linear worst case
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(fast[1]), flat_slow):
        assert_close(np.asarray(a), np.asarray(b), terms=terms, what=f"{jax.tree_util.keystr(p)}: ")
