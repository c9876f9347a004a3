"""Tests for the mobile backbones: VarGFaceNet / VarGNet (Yan et al. 2019), MobileNetV1/V2 and
MobileFaceNet(-R) (Duong et al. 2019).

Shapes, parameter counts and multiply-adds are checked abstractly (``nnx.eval_shape``, jaxpr
walks), against hand-written stage tables and the published numbers. Concrete runs use weights
filled from NumPy (cheap: no RNG kernels to compile) and are kept to one compiled program per
network. Blocks are compared with float64 NumPy loops over their definitions.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdface.models import create, names
from kdface.models._mobilefacenet import (GDCEmbedding, InvertedResidual, mobile_activation)
from kdface.models._stats import count_macs, count_params, xla_flops
from kdface.models._vargfacenet import VarGroupSeparable

from _tolerance import assert_close

# Written here, not imported from kdface.models._layers, so that the reference stays
# independent of the code under test: insightface's BatchNorm epsilon (kdface/models/_layers.py).
BN_EPSILON = 1e-5

NETS = ("vargfacenet", "vargnet", "mobilenet_v1", "mobilenet_v2", "mobilefacenet",
        "mobilefacenet_r")

# Stage (H, W, C) at 112x112, as documented in each module.
STAGES_112 = {
    "vargfacenet": [(56, 56, 40), (28, 28, 80), (14, 14, 160), (7, 7, 320)],
    "vargnet": [(56, 56, 40), (28, 28, 80), (14, 14, 160), (7, 7, 320)],
    "mobilenet_v1": [(56, 56, 128), (28, 28, 256), (14, 14, 512), (7, 7, 1024)],
    "mobilenet_v2": [(56, 56, 24), (28, 28, 32), (14, 14, 96), (7, 7, 320)],
    "mobilefacenet": [(56, 56, 64), (28, 28, 64), (14, 14, 128), (7, 7, 128)],
    # The IResNet teacher's stages (Duong et al. 2019 sec. 4.2).
    "mobilefacenet_r": [(56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)],
}
WIDTHS_96 = (48, 24, 12, 6)  # W of each stage for a 112x96 input


def expected_stages(name, hw):
    if hw == (112, 112):
        return STAGES_112[name]
    return [(h, w, c) for (h, _, c), w in zip(STAGES_112[name], WIDTHS_96)]


def abstract(name, hw=(112, 112), **kw):
    """The abstract model (shapes only), built once per configuration for the whole module."""
    return _abstract(name, tuple(hw), tuple(sorted(kw.items())))


@functools.cache
def _abstract(name, hw, kw):
    return nnx.eval_shape(lambda: create(name, rngs=nnx.Rngs(0), input_size=hw, **dict(kw)))


def numpy_filled(model, seed=0):
    """``model`` (abstract or not) with NumPy-drawn weights and non-trivial BN statistics."""
    graphdef, state = nnx.split(model)
    rs = np.random.RandomState(seed)

    def draw(path, leaf):
        name = path[-2].key
        shape = leaf.shape
        if name == "kernel":
            v = rs.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif name in ("bias", "mean"):
            v = rs.normal(0.0, 0.1, size=shape)
        elif name == "alpha":
            v = rs.uniform(0.0, 0.5, size=shape)
        else:  # BN scale and var
            v = rs.uniform(0.5, 1.5, size=shape)
        return jnp.asarray(v, jnp.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def test_all_registered():
    assert set(NETS) <= set(names())


@pytest.mark.parametrize("name", NETS)
def test_stage_and_output_shapes_112x112(name):
    # 112x96 shapes are checked on a concrete run in test_forward_from_equals_full_forward.
    hw = (112, 112)
    model = abstract(name, hw)
    graphdef, state = nnx.split(model)

    def run(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(x, return_stages=True)

    emb, stages = jax.eval_shape(run, state, jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32))
    assert emb.shape == (2, 512)
    assert [s.shape for s in stages] == [(2, *s) for s in expected_stages(name, hw)]


def test_stage_shapes_method():
    assert abstract("mobilefacenet_r", (112, 96)).stage_shapes((112, 96)) == [
        (56, 48, 64), (28, 24, 128), (14, 12, 256), (7, 6, 512)]


def test_final_kernel_follows_input_size():
    # Yan et al. 2019 sec. 2.3.2: the grouped conv shrinks the last map to 1x1 (7x6 at 112x96).
    assert abstract("vargfacenet", (112, 96)).shrink.kernel.shape == (7, 6, 8, 1024)
    assert abstract("mobilefacenet", (112, 96)).head.gdconv.kernel.shape == (7, 6, 1, 512)
    assert abstract("mobilenet_v1", (112, 112)).head.gdconv.kernel.shape == (7, 7, 1, 1024)


@pytest.mark.parametrize("name,kwargs,published,source", [
    ("vargfacenet", {}, 5.0e6, "yan2019 Table 1: 5M"),
    ("mobilefacenet", {}, 1.2e6, "duong2019 Table 2: MFN 1.2M"),
    ("mobilefacenet", {"embedding_size": 128}, 0.99e6, "Chen et al. 2018: 0.99M"),
    ("mobilefacenet_r", {}, 3.73e6, "duong2019 Table 2: MFNR 3.73M"),
    ("mobilenet_v1", {}, 3.53e6, "duong2019 Table 2: MV1 3.53M"),
    ("mobilenet_v2", {}, 2.15e6, "duong2019 Table 2: MV2 2.15M"),
])
def test_param_counts_near_published(name, kwargs, published, source):
    n = count_params(abstract(name, **kwargs))
    # not a rounding tolerance: our layouts vs a paper's rounded table (15%: the papers leave
    # details such as the embedding block's widths open)
    assert abs(n - published) <= 0.15 * published, (source, n)


def test_mobilefacenet_matches_its_paper_closely():
    # Chen et al. 2018 fully specify MobileFaceNet: 0.99 M parameters, 221 M MAdds at 128-d.
    model = abstract("mobilefacenet", embedding_size=128)
    # not rounding: integer counts vs the paper's two-digit figures (2%: their rounding)
    assert abs(count_params(model) - 0.99e6) <= 0.02 * 0.99e6
    assert abs(count_macs(model) - 221e6) <= 0.02 * 221e6


def test_vargface_embedding_block_is_5_78_mib():
    # Yan et al. 2019 sec. 2.3.2: "The new embedding block setting only takes up 5.78M" (float32).
    m = abstract("vargfacenet")
    weights = (m.expand.conv.kernel, m.shrink.kernel, m.point.conv.kernel, m.fc.kernel)
    n = sum(int(np.prod(w.shape)) for w in weights)
    assert n == 320 * 1024 + 49 * 8 * 1024 + 1024 * 512 + 512 * 512
    assert round(4 * n / 2**20, 2) == 5.78


def test_mac_counting_on_a_single_grouped_conv():
    conv = nnx.Conv(16, 32, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2,
                    use_bias=False, rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((1, 10, 8, 16), jnp.float32)
    from kdface.models._stats import count_fn_macs
    # Every tap, padding included: H * W * k * k * (C_in / groups) * C_out.
    assert count_fn_macs(conv, x) == 10 * 8 * 9 * 8 * 32
    # XLA skips taps on padding: (3H - 2)(3W - 2) valid taps per (C_in/g) * C_out.
    flops = jax.jit(conv).lower(x).cost_analysis()["flops"]
    assert flops / 2 == (3 * 10 - 2) * (3 * 8 - 2) * 8 * 32


@pytest.mark.parametrize("name,published", [("vargfacenet", 1022e6), ("vargnet", 1029e6)])
def test_vargface_flops_near_published(name, published):
    # Yan et al. 2019 Table 4 gives FLOPs = 2 x multiply-adds (its r100 teacher, "24G", has 12.1 G
    # multiply-adds at 112x112), so 1022 M FLOPs are ~511 M multiply-adds.
    model = abstract(name)
    macs = count_macs(model)
    # not rounding: integer counts vs the paper's table (15% as for the parameter counts)
    assert abs(2 * macs - published) <= 0.15 * published, macs
    assert abs(2 * macs - published) <= 0.02 * published, macs  # in fact within 2%
    if name == "vargfacenet":
        # XLA's independent count (padding taps skipped, element-wise ops added) agrees.
        assert abs(xla_flops(model) - published) <= 0.15 * published


@pytest.mark.parametrize("name", NETS)
def test_forward_from_equals_full_forward(name):
    hw = (112, 96)
    model = numpy_filled(abstract(name, hw))
    model.eval()
    x = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (2, *hw, 3)), jnp.float32)

    @nnx.jit
    def run(m, x):
        emb, stages = m(x, return_stages=True)
        return emb, stages, [m.forward_from(i, stages[i]) for i in range(4)]

    emb, stages, tails = run(model, x)
    assert emb.shape == (2, 512) and bool(jnp.all(jnp.isfinite(emb)))
    assert float(jnp.std(emb)) > 1e-3  # a live signal, not a collapsed one
    assert [s.shape[1:] for s in stages] == expected_stages(name, hw)
    for i, tail in enumerate(tails):
        np.testing.assert_array_equal(np.asarray(tail), np.asarray(emb), err_msg=f"stage {i}")


def _tiny():
    return numpy_filled(abstract("mobilefacenet_r", (32, 32), stage_channels=(8, 8, 16, 16),
                                 embedding_size=16))


def test_train_and_eval_batch_norm_differ():
    model = _tiny()
    x = jnp.asarray(np.random.RandomState(2).normal(size=(4, 32, 32, 3)), jnp.float32)
    mean_before = np.asarray(model.conv1.bn.mean[...])

    @nnx.jit
    def run(m, x):
        return m(x)

    model.eval()
    y_eval = run(model, x)
    np.testing.assert_array_equal(np.asarray(model.conv1.bn.mean[...]), mean_before)
    model.train()
    y_train = run(model, x)
    # not a rounding tolerance: train mode (batch statistics) must differ from eval by far
    # more than 1e-3 (numpy_filled's running statistics are far from this batch's)
    assert not np.allclose(np.asarray(y_train), np.asarray(y_eval), rtol=1e-3, atol=1e-3)
    # Train mode updates the running mean: 0.9 * old + 0.1 * batch mean of the stem conv.
    stem = np.asarray(model.conv1.conv(x), np.float64)
    batch_mean = stem.mean(axis=(0, 1, 2))
    # float32 vs float32 in another order (case 3: the jitted step's conv and mean vs the eager
    # conv here, its mean in float64): 2 x (the 3x3x3 conv + the mean over 4 x 16 x 16
    # positions); scale: 0.1 x max|stem conv output| and 0.9 x max|old mean|
    assert_close(np.asarray(model.conv1.bn.mean[...]), 0.9 * mean_before + 0.1 * batch_mean,
                 terms=2 * (27 + stem.size // stem.shape[-1]),
                 scale=0.1 * np.max(np.abs(stem)) + 0.9 * np.max(np.abs(mean_before)))


def test_deterministic_init_from_seed():
    # An 'rbg' key: the same determinism as the default threefry key, with RNG kernels that
    # compile in seconds rather than minutes on a loaded CPU.
    def params(seed):
        model = create("vargnet", rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")),
                       input_size=(32, 32), multiplier=0.25, last_channels=64, embedding_size=8)
        return jax.tree.leaves(nnx.state(model, nnx.Param))

    a, b, c = params(0), params(0), params(1)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


# --- blocks against float64 NumPy loops ---------------------------------------------------------

def _np_conv(x, k, stride, pad, groups):
    """x: [H, W, C_in], k: [kh, kw, C_in / groups, C_out] -> [H', W', C_out] (loops)."""
    h, w, c_in = x.shape
    kh, kw, cg, c_out = k.shape
    xp = np.zeros((h + 2 * pad, w + 2 * pad, c_in))
    xp[pad:pad + h, pad:pad + w] = x
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    og = c_out // groups
    out = np.zeros((ho, wo, c_out))
    for i in range(ho):
        for j in range(wo):
            patch = xp[i * stride:i * stride + kh, j * stride:j * stride + kw]
            for o in range(c_out):
                g = o // og
                out[i, j, o] = np.sum(patch[:, :, g * cg:(g + 1) * cg] * k[:, :, :, o])
    return out


def _f64(variable):
    return np.asarray(variable[...], np.float64)


def _np_bn(x, bn, scale=True):
    """Eval-mode BN: (x - running mean) / sqrt(running var + eps) * scale + bias."""
    y = (x - _f64(bn.mean)) / np.sqrt(_f64(bn.var) + BN_EPSILON)
    return (y * _f64(bn.scale) if scale else y) + _f64(bn.bias)


def _np_prelu(x, alpha):
    return np.where(x >= 0, x, _f64(alpha) * x)


def _np_var_group_separable(block, x):
    k1 = np.asarray(block.group.conv.kernel[...], np.float64)
    k2 = np.asarray(block.point.conv.kernel[...], np.float64)
    groups = x.shape[-1] // k1.shape[2]
    h = _np_prelu(_np_bn(_np_conv(x, k1, 2, 1, groups), block.group.bn), block.group.act.alpha)
    h = _np_prelu(_np_bn(_np_conv(h, k2, 1, 0, 1), block.point.bn), block.point.act.alpha)
    return h


def _separable_block():
    block = nnx.eval_shape(lambda: VarGroupSeparable(16, 8, stride=2, factor=2, group_size=8,
                                                     act="prelu", act_out=True,
                                                     rngs=nnx.Rngs(0)))
    block = numpy_filled(block, seed=3)
    block.eval()
    return block


def test_variable_group_conv_matches_numpy():
    # Yan et al. 2019 eqs. (1)-(2): S = 8 input channels per group, n = C / S = 2 groups here.
    block = _separable_block()
    assert block.group.conv.kernel.shape == (3, 3, 8, 32)
    x = np.random.RandomState(4).normal(size=(5, 5, 16))
    want = _np_var_group_separable(block, x)
    got = block(jnp.asarray(x[None], jnp.float32))[0]
    # float32 vs float64 loops (case 2/4): the grouped 3x3x8 conv then the 1x1x32 pointwise,
    # 72 + 32 terms on the path; scale max|want|
    assert_close(np.asarray(got), want, terms=3 * 3 * 8 + 32)
    # jit vs eager: float32 vs float32 (case 3), 2 x the same path
    assert_close(np.asarray(nnx.jit(lambda b, x: b(x))(block, x[None].astype(np.float32)))[0],
                 np.asarray(got), terms=2 * (3 * 3 * 8 + 32))


def test_variable_group_conv_gradient_matches_finite_differences():
    block = _separable_block()
    x = np.random.RandomState(5).normal(size=(5, 5, 16))
    w = np.random.RandomState(6).normal(size=(3, 3, 8))

    def loss(xx):
        return jnp.sum(block(xx[None])[0] * jnp.asarray(w, jnp.float32))

    grad = np.asarray(jax.grad(loss)(jnp.asarray(x, jnp.float32)))
    rs = np.random.RandomState(7)
    eps = 1e-6
    for _ in range(6):
        idx = tuple(rs.randint(n) for n in x.shape)
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd = (np.sum(_np_var_group_separable(block, xp) * w)
              - np.sum(_np_var_group_separable(block, xm) * w)) / (2 * eps)
        # float32 gradient vs float64 central differences (step 1e-6: truncation ~1e-12,
        # cancellation ~1e-10, far below float32's): the gradient's reductions on its path,
        # the 72 loss terms, the 32-channel pointwise and the 3x3x8 depthwise taps, against
        # the largest gradient entry.
        assert_close(grad[idx], fd, terms=72 + 32 + 3 * 3 * 8, scale=float(np.abs(grad).max()),
                     what=f"grad{idx}: ")


def test_gdc_embedding_matches_numpy():
    head = nnx.eval_shape(lambda: GDCEmbedding(4, (3, 2), 5, last_channels=None, act="prelu",
                                               rngs=nnx.Rngs(0)))
    head = numpy_filled(head, seed=8)
    head.eval()
    x = np.random.RandomState(9).normal(size=(2, 3, 2, 4))
    k = np.asarray(head.gdconv.kernel[...], np.float64)[:, :, 0, :]  # [3, 2, C]
    g = _np_bn(np.einsum("bhwc,hwc->bc", x, k), head.gd_bn)
    want = _np_bn(g @ np.asarray(head.linear.kernel[...], np.float64), head.bn, scale=False)
    got = head(jnp.asarray(x, jnp.float32))
    # float32 vs float64 (case 2/4): the 3x2 global depthwise conv (6 terms) then the linear
    # map over 4 channels; scale max|want|
    assert_close(np.asarray(got), want, terms=3 * 2 + 4)


def test_inverted_residual_adds_input_only_when_shapes_match():
    def block(c_in, c_out, stride):
        b = numpy_filled(nnx.eval_shape(lambda: InvertedResidual(
            c_in, c_out, expansion=2, stride=stride, rngs=nnx.Rngs(0))), seed=10)
        b.eval()
        # Zero the projection's BN output: the block then returns exactly its shortcut.
        b.project.bn.scale[...] = jnp.zeros_like(b.project.bn.scale[...])
        b.project.bn.bias[...] = jnp.zeros_like(b.project.bn.bias[...])
        return b

    x = jnp.asarray(np.random.RandomState(11).normal(size=(1, 4, 4, 8)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(block(8, 8, 1)(x)), np.asarray(x))
    assert not np.any(np.asarray(block(8, 8, 2)(x)))
    assert not np.any(np.asarray(block(8, 16, 1)(x)))


# --- argument checks ----------------------------------------------------------------------------

def test_wrong_input_size_raises():
    model = abstract("mobilefacenet")
    graphdef, state = nnx.split(model)

    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    with pytest.raises(ValueError, match="input_size"):
        jax.eval_shape(run, state, jax.ShapeDtypeStruct((1, 112, 96, 3), jnp.float32))
    with pytest.raises(ValueError, match="stage-3 feature"):
        abstract("vargfacenet").embed(jnp.zeros((1, 6, 6, 320)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        jax.eval_shape(run, state, jax.ShapeDtypeStruct((112, 112, 3), jnp.float32))


@pytest.mark.parametrize("name,kwargs,match", [
    ("vargfacenet", {"multiplier": 1.1}, "group_size"),
    ("vargfacenet", {"embedding": "gap"}, "embedding"),
    ("vargfacenet", {"input_size": (112,)}, "input_size"),
    ("mobilefacenet_r", {"stage_channels": (64, 128)}, "stage_channels"),
    ("mobilenet_v1", {"width_multiplier": 0}, "width_multiplier"),
    ("mobilenet_v2", {"act": "gelu"}, "activation"),
    ("mobilefacenet", {"embedding_size": 0}, "embedding_size"),
])
def test_bad_options_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda: create(name, rngs=nnx.Rngs(0), **kwargs))


def test_relu6():
    act = mobile_activation("relu6", 3, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(act(jnp.array([-1.0, 2.0, 7.0]))), [0.0, 2.0, 6.0])
