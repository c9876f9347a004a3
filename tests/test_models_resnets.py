"""Residual backbones: SphereFace nets, IResNet (+SE), ResNet-50 /1 /2 /4 /8.

References are independent of the code under test: stage shapes and parameter counts come from
the papers' tables / published numbers and closed-form sums, and single units are compared with
a float64 NumPy implementation written from the papers' unit definitions.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _tolerance import assert_close
from _model_helpers import abstract_model, concrete_model, materialize
from kdface.models import count_params, create, names
from kdface.models._iresnet import IBasicUnit, IResNet
from kdface.models._resnet import Bottleneck
from kdface.models._sphereface import SphereNet, SphereUnit

MINE = ("sphereface20", "sphereface36", "sphereface64", "sphereface36_thin", "iresnet18",
        "iresnet34", "iresnet50", "iresnet100", "se_iresnet100", "resnet50")
WIDE = (64, 128, 256, 512)
# (name, kwargs) -> stage channels, from Wang et al. 2019 Tables 1-2, insightface, Wang et al. 2017.
CHANNELS = {
    ("sphereface20", 1): WIDE, ("sphereface36", 1): WIDE, ("sphereface64", 1): WIDE,
    ("sphereface36_thin", 1): (18, 36, 72, 144), ("iresnet18", 1): WIDE,
    ("iresnet34", 1): WIDE, ("iresnet50", 1): WIDE, ("iresnet100", 1): WIDE,
    ("se_iresnet100", 1): WIDE, ("resnet50", 1): (256, 512, 1024, 2048),
    ("resnet50", 2): (128, 256, 512, 1024), ("resnet50", 4): (64, 128, 256, 512),
    ("resnet50", 8): (32, 64, 128, 256),
}


def _kwargs(name, divisor, **kw):
    return dict(kw, width_divisor=divisor) if name == "resnet50" else kw


def test_all_names_registered():
    assert set(MINE) <= set(names())


SHAPE_CASES = [(n, d, (112, 112)) for n, d in sorted(CHANNELS)]
SHAPE_CASES += [(n, 1, (112, 96)) for n in ("sphereface36_thin", "sphereface64")]


@pytest.mark.parametrize("name,divisor,hw", SHAPE_CASES)
def test_shapes_abstract(name, divisor, hw):
    # One abstract trace per network (deep networks take seconds to trace on a loaded CPU);
    # ``stage_shapes`` itself is checked against real stage outputs in the forward tests.
    model = abstract_model(name, **_kwargs(name, divisor, input_size=hw))
    expected = [(hw[0] // s, hw[1] // s, c) for s, c in zip((2, 4, 8, 16), CHANNELS[name, divisor])]
    graphdef, state = nnx.split(model)

    def run(state, x):
        return nnx.merge(graphdef, state)(x, return_stages=True)

    emb, stages = jax.eval_shape(run, state, jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32))
    assert emb.shape == (2, 512)
    assert [tuple(s.shape[1:]) for s in stages] == expected


# Real forward passes (NumPy-filled weights, eval mode): the small networks at 112x112 and deep
# ones at full depth on a 32x32 input (FC sized for it). iresnet34/100, se_iresnet100,
# sphereface20/36 and resnet50 /1 /2 /4 share their class and code path with these and are
# checked abstractly above (their real forwards cost minutes of CPU on the shared machine); the
# SE unit is checked against NumPy below.
FORWARD_CASES = [("sphereface36_thin", 1, (112, 112)), ("iresnet18", 1, (112, 112)),
                 ("resnet50", 8, (112, 112)), ("sphereface64", 1, (32, 32)),
                 ("iresnet50", 1, (32, 32))]


@pytest.mark.parametrize("name,divisor,hw", FORWARD_CASES)
def test_forward_from_equals_call(name, divisor, hw):
    model = concrete_model(name, **_kwargs(name, divisor, input_size=hw))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, *hw, 3)), jnp.float32)
    emb, stages = model(x, return_stages=True)
    assert emb.shape == (1, 512) and bool(jnp.all(jnp.isfinite(emb)))
    assert [tuple(s.shape[1:]) for s in stages] == model.stage_shapes(hw)
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(model.forward_from(i, stages[i])),
                                      np.asarray(emb))
    with pytest.raises(ValueError, match="stage index"):
        model.forward_from(4, stages[3])


def test_wrong_input_size_raises():
    model = concrete_model("sphereface36_thin", input_size=(32, 16))
    with pytest.raises(ValueError, match="input_size"):
        model(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model(jnp.zeros((1, 32, 16)))
    with pytest.raises(ValueError, match="width_divisor"):
        create("resnet50", rngs=nnx.Rngs(0), width_divisor=3)
    with pytest.raises(ValueError, match="input_size"):
        create("iresnet18", rngs=nnx.Rngs(0), input_size=(112,))
    with pytest.raises(ValueError, match="unknown backbone"):
        create("iresnet101", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("name,published", [("iresnet50", 43.6e6), ("iresnet100", 65.2e6)])
def test_published_param_counts(name, published):
    # insightface arcface_torch model list: IResNet-50 43.6 M, IResNet-100 65.2 M parameters.
    assert abs(count_params(abstract_model(name)) - published) / published < 0.01


def _sphere_params(channels, units, hw, emb=512):
    total, cin = 0, 3
    for c, n in zip(channels, units):
        total += 9 * cin * c + c + c          # stride-2 conv with bias, PReLU
        total += n * 2 * (9 * c * c + c)      # two bias-free convs + PReLU per unit
        cin = c
    return total + cin * (hw[0] // 16) * (hw[1] // 16) * emb + emb


def test_sphereface_param_counts_from_tables():
    for name, ch, units in [("sphereface36_thin", (18, 36, 72, 144), (2, 4, 8, 2)),
                            ("sphereface64", WIDE, (3, 8, 16, 3)),
                            ("sphereface20", WIDE, (1, 2, 4, 1))]:
        for hw in [(112, 96), (112, 112)]:
            expected = _sphere_params(ch, units, hw)
            assert count_params(abstract_model(name, input_size=hw)) == expected


def test_se_iresnet100_adds_exactly_se_params():
    se = 0
    for c, n in zip(WIDE, (3, 13, 30, 3)):
        r = c // 16
        se += n * (c * r + r + r + r * c + c)   # fc1 + bias, PReLU, fc2 + bias
    extra = (count_params(abstract_model("se_iresnet100"))
             - count_params(abstract_model("iresnet100")))
    assert extra == se


def test_resnet50_param_count():
    # torchvision ResNet-50 without its 1000-way FC has 23,508,032 parameters; ours swaps the
    # 7x7x3x64 stem conv for 3x3x3x64, adds the input BN (6) and the 2048->512 FC + bias-only BN.
    expected = 23_508_032 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64 + 6 + 2048 * 512 + 512 + 512
    assert count_params(abstract_model("resnet50")) == expected
    sizes = [count_params(abstract_model("resnet50", width_divisor=d)) for d in (1, 2, 4, 8)]
    assert sizes == sorted(sizes, reverse=True)
    # Convolution weights scale ~1/d^2: /2 has about a quarter of the conv parameters.
    assert 3.3 < (sizes[0] - 2048 * 512) / (sizes[1] - 1024 * 512) < 4.1


# ---------------------------------------------------------------- units vs NumPy (float64)

def _np_conv(x, w, stride, pad, bias=None):
    """Plain NHWC convolution, w: [kh, kw, cin, cout]."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw, _, cout = w.shape
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, cout))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, w)
    return out if bias is None else out + bias


def _np_bn(x, bn):  # eval mode
    mean, var = np.asarray(bn.mean[...], np.float64), np.asarray(bn.var[...], np.float64)
    scale = np.asarray(bn.scale[...], np.float64) if bn.scale is not None else 1.0
    bias = np.asarray(bn.bias[...], np.float64) if bn.bias is not None else 0.0
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def _np_prelu(x, p):
    return np.where(x >= 0, x, np.asarray(p.alpha[...], np.float64) * x)


def _w(v):
    return np.asarray(v[...], np.float64)


def _filled(make, seed):
    """Module built abstractly, then given NumPy weights and non-trivial BN statistics."""
    module = materialize(nnx.eval_shape(make), seed)
    module.eval()
    return module


def _x(shape, seed):
    return np.random.default_rng(seed).normal(size=shape)


def _kernel_terms(module) -> int:
    """The reductions of a unit's convolutions and linear maps (case 4 of tests/_tolerance.py):
    the sum over its kernels of k*k*C_in (the shortcut's too, so an upper bound of the path)."""
    kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(module, nnx.Param))
               if "kernel" in jax.tree_util.keystr(p) and v.ndim >= 2]
    return int(sum(np.prod(k.shape[:-1]) for k in kernels))


def test_ibasic_unit_with_se_matches_numpy():
    unit = _filled(lambda: IBasicUnit(4, 32, 2, se=True, rngs=nnx.Rngs(0)), 3)
    unit.prelu.alpha[...] = jnp.linspace(0.1, 0.5, 32)
    x = _x((2, 6, 6, 4), 5)
    h = _np_bn(x, unit.bn1)
    h = _np_prelu(_np_bn(_np_conv(h, _w(unit.conv1.kernel), 1, 1), unit.bn2), unit.prelu)
    h = _np_bn(_np_conv(h, _w(unit.conv2.kernel), 2, 1), unit.bn3)
    se = unit.se
    s = h.mean(axis=(1, 2))
    s = s @ _w(se.fc1.kernel)[0, 0] + _w(se.fc1.bias)
    s = np.where(s >= 0, s, _w(se.act.alpha) * s)
    s = 1 / (1 + np.exp(-(s @ _w(se.fc2.kernel)[0, 0] + _w(se.fc2.bias))))
    h = h * s[:, None, None, :]
    short = _np_bn(_np_conv(x, _w(unit.down_conv.kernel), 2, 0), unit.down_bn)
    # float32 unit vs float64 NumPy (case 2/4): the convs' and SE FCs' reductions summed over
    # the path, + the SE's mean over the 3x3 output positions; scale max|ref|
    assert_close(unit(jnp.asarray(x, jnp.float32)), h + short,
                 terms=_kernel_terms(unit) + 3 * 3)


def test_bottleneck_matches_numpy():
    unit = _filled(lambda: Bottleneck(8, 4, 2, rngs=nnx.Rngs(0)), 6)
    x = _x((2, 5, 5, 8), 8)
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    h = relu(_np_bn(_np_conv(x, _w(unit.conv1.kernel), 1, 0), unit.bn1))
    h = relu(_np_bn(_np_conv(h, _w(unit.conv2.kernel), 2, 1), unit.bn2))
    h = _np_bn(_np_conv(h, _w(unit.conv3.kernel), 1, 0), unit.bn3)
    short = _np_bn(_np_conv(x, _w(unit.down_conv.kernel), 2, 0), unit.down_bn)
    # float32 vs float64 NumPy (case 2/4): 1x1x8 + 3x3x4 + 1x1x4 (+ the 1x1x8 shortcut) terms
    assert_close(unit(jnp.asarray(x, jnp.float32)), relu(h + short), terms=_kernel_terms(unit))


def test_sphere_unit_matches_numpy():
    unit = _filled(lambda: SphereUnit(3, bn=False, rngs=nnx.Rngs(0)), 9)
    for conv_act in (unit.a, unit.b):
        conv_act.conv.kernel[...] = conv_act.conv.kernel[...] * 3.0  # O(1) branch
        conv_act.prelu.alpha[...] = jnp.asarray([0.1, 0.2, 0.3])
    x = _x((2, 5, 4, 3), 12)
    h = _np_prelu(_np_conv(x, _w(unit.a.conv.kernel), 1, 1), unit.a.prelu)
    h = _np_prelu(_np_conv(h, _w(unit.b.conv.kernel), 1, 1), unit.b.prelu)
    # float32 vs float64 NumPy (case 2/4): two 3x3x3 convs, 27 terms each
    assert_close(unit(jnp.asarray(x, jnp.float32)), x + h, terms=_kernel_terms(unit))


# ---------------------------------------------------------------- modes, determinism, grads

def _tiny_iresnet(seed):
    return _filled(lambda: IResNet((1, 1, 1, 1), rngs=nnx.Rngs(0), input_size=(16, 16),
                                   embedding_size=32), seed)


def test_train_vs_eval_batch_norm():
    model = _tiny_iresnet(0)
    x = jnp.asarray(_x((4, 16, 16, 3), 13) * 3.0 + 1.0, jnp.float32)
    e1, e2 = model(x), model(x)
    np.testing.assert_array_equal(e1, e2)                       # eval is deterministic
    model.stem_bn.mean[...] = jnp.zeros(64)
    before = np.asarray(model.stem_bn.mean[...])
    model.train()
    t = model(x)
    # not a rounding tolerance: train mode must differ from eval (batch vs running statistics)
    # by far more than 1e-3, a difference of O(1) here (inputs of mean 1, std 3)
    assert not np.allclose(t, e1, atol=1e-3)
    after = np.asarray(model.stem_bn.mean[...])
    assert np.all(before != after)           # running stats updated in train (exact: != 0)
    # Flax convention: running = 0.9 * running + 0.1 * batch mean.
    stem = np.asarray(model.stem_conv(x), np.float64)
    batch_mean = stem.mean(axis=(0, 1, 2))
    # float32 vs float32 in another order (case 3; the model's conv and mean vs the eager conv
    # here, its mean in float64): 2 x (3x3x3 conv + the mean over 4 x 16 x 16 positions);
    # scale: 0.1 x max|stem conv output|, the magnitude of the averaged terms
    assert_close(after, 0.9 * before + 0.1 * batch_mean, terms=2 * (27 + x.size // 3),
                 scale=0.1 * float(np.max(np.abs(stem))))
    model.eval()
    jitted = nnx.jit(lambda m, x: m(x))(model, x)
    # jit vs eager: float32 vs float32 (case 3/4), 2 x the network's path; scale max|eager|
    assert_close(jitted, model(x), terms=2 * _kernel_terms(model))


def test_deterministic_init():
    # Real random initialisation (a narrow SphereNet keeps the number of compiled shapes small).
    def params(seed):
        net = SphereNet((4, 4, 4, 4), (1, 1, 0, 0), rngs=nnx.Rngs(seed), input_size=(16, 16),
                        embedding_size=8, batch_norm=True)
        return [np.asarray(v) for v in jax.tree.leaves(nnx.state(net, nnx.Param))]
    a, b, c = params(0), params(0), params(1)
    assert len(a) == len(b) == len(c) > 0
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert all(not np.array_equal(u, v) for u, v in zip(a, c) if np.std(u) > 0)


def test_gradients_finite_and_match_finite_differences():
    # Train mode (BN on batch statistics, the path gradients take during training): the
    # directional derivative along a random direction matches central differences.
    model = _tiny_iresnet(0)
    model.train()
    x = jnp.asarray(_x((4, 16, 16, 3), 14), jnp.float32)
    value_and_grad = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(jnp.square(m(x)))))
    _, g = value_and_grad(model)
    for path, leaf in jax.tree.leaves_with_path(g):
        assert bool(jnp.all(jnp.isfinite(leaf))), path
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(15)
    d = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=v.shape), jnp.float32)
                                     for v in leaves])
    eps = 1e-3
    # Both perturbed states first: nnx.state holds references to the model's variables.
    shifted = [jax.tree.map(lambda p, v: p + sign * eps * v, params, d) for sign in (1, -1)]
    nnx.update(model, shifted[0])
    plus = value_and_grad(model)[0]           # same graph: no recompilation
    nnx.update(model, shifted[1])
    minus = value_and_grad(model)[0]
    fd = (float(plus) - float(minus)) / (2 * eps)
    analytic = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
    # not a rounding tolerance: central differences with step 1e-3 in float32 carry a
    # truncation error O(step^2) and a cancellation error ~ eps32 |loss| / step; 2% is the
    # check's resolution, a wrong gradient (a sign, a missing term) is off by O(1)
    assert math.isclose(fd, analytic, rel_tol=2e-2), (fd, analytic)
