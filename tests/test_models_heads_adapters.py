"""Heads (margin / softmax / landmark) and adapters (conv / linear), against NumPy float64."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from _model_helpers import abstract_model, concrete_model, materialize
from _tolerance import assert_close
from kdface.models import (ConvAdapter, LandmarkHead, LinearAdapter, MarginHead, SoftmaxHead,
                           resize_features, stage_adapters)


def _np(variable):
    return np.asarray(variable[...], np.float64)


def _filled(make, seed=0):
    """Module built abstractly and given NumPy weights (random init compiles per shape, slow
    on the shared CPU); the initializers themselves are exercised by MarginHead's tests."""
    return materialize(nnx.eval_shape(make), seed)


def _emb(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


# ---------------------------------------------------------------- heads

def test_margin_head_is_cosine_of_normalized_vectors():
    head = MarginHead(6, 5, rngs=nnx.Rngs(0))
    x = _emb((3, 6))
    cos = head(x)
    xn, w = np.asarray(x, np.float64), _np(head.weight)
    ref = np.zeros((3, 5))
    for b in range(3):
        for c in range(5):
            ref[b, c] = xn[b] @ w[:, c] / (np.linalg.norm(xn[b]) * np.linalg.norm(w[:, c]))
    assert cos.shape == (3, 5) and cos.dtype == jnp.float32
    # float32 vs float64 (case 2): the dot product and the two norms each sum 6 terms, then a
    # rsqrt/divide or two; scale 1 (|cos| <= 1, unit vectors' entries are <= 1)
    assert_close(cos, ref, terms=6 + 3, scale=1.0)
    # scale invariance: float32 vs float32 (case 3; 7.5 x changes every rounding)
    assert_close(head(7.5 * x), cos, terms=2 * (6 + 3), scale=1.0)
    assert float(jnp.max(jnp.abs(cos))) <= 1.0
    assert head(x.astype(jnp.bfloat16)).dtype == jnp.float32
    assert_close(jax.jit(head)(x), cos, terms=2 * (6 + 3), scale=1.0)   # jit vs eager, case 3


def test_margin_head_gradients():
    head = MarginHead(4, 3, rngs=nnx.Rngs(1))
    check_grads(lambda x: jnp.sum(head(x) * jnp.arange(3.0)[None, :]), (_emb((2, 4)),),
                order=1, modes=("rev",), atol=1e-2, rtol=1e-2)  # not rounding: float32
    # finite differences (JAX's default step 1e-3 in float32) carry ~1e-3 truncation and
    # cancellation error; 1e-2 is check_grads' usual resolution, a wrong gradient is O(1) off


def test_margin_head_tpu_formulation_is_the_same_cosines_and_gradients():
    # Traced for a TPU (kdface._platform.compiling_for), the head normalizes W's columns before
    # the product instead of scaling the product after it (models/_heads.py: l2_normalize(w, axis=0)),
    # run here on the CPU. Both equal the float64 cosines and their analytic gradients: with
    # L = Σ a_bc cos_bc, dL/dw_c = (I - ŵ_c ŵ_cᵀ) Σ_b a_bc x̂_b / ||w_c||, likewise for x_b.
    from kdface._platform import compiling_for
    e, c, b = 6, 5, 3
    head = MarginHead(e, c, rngs=nnx.Rngs(4))
    x = _emb((b, e), 3)
    a = jnp.asarray(np.random.default_rng(5).normal(size=(b, c)), jnp.float32)
    graphdef, state = nnx.split(head)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x) * a)

    xn, w, an = np.asarray(x, np.float64), _np(head.weight), np.asarray(a, np.float64)
    nx, nw = np.linalg.norm(xn, axis=1), np.linalg.norm(w, axis=0)
    xh, wh = xn / nx[:, None], w / nw[None, :]
    gwh, gxh = xh.T @ an, an @ wh.T                      # [E, C], [B, E]
    ref_gw = (gwh - wh * np.sum(gwh * wh, axis=0)) / nw
    ref_gx = (gxh - xh * np.sum(gxh * xh, axis=1, keepdims=True)) / nx[:, None]
    for target in ("cpu", "tpu"):
        with compiling_for(target):
            value, (gstate, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)
        gw = gstate["weight"][...]
        # float32 vs float64 (case 2): the cosines as above (6 + 3 terms, scale 1) summed over
        # B·C = 15 weighted terms; each gradient entry sums B or C products, then the
        # projection sums E more: scale Σ|a| / min norm
        assert_close(value, np.sum(xh @ wh * an), terms=(e + 3) + b * c,
                     scale=float(np.sum(np.abs(an))), what=f"{target}: ")
        assert_close(gw, ref_gw, terms=e + 3 + b + e, scale=float(np.abs(an).sum() / nw.min()),
                     what=f"{target} dW: ")
        assert_close(gx, ref_gx, terms=e + 3 + c + e, scale=float(np.abs(an).sum() / nx.min()),
                     what=f"{target} dx: ")


def test_margin_head_zero_embedding_is_finite():
    head = MarginHead(4, 3, rngs=nnx.Rngs(1))
    out, grad = jax.value_and_grad(lambda x: jnp.sum(head(x)))(jnp.zeros((1, 4)))
    assert bool(jnp.isfinite(out)) and bool(jnp.all(jnp.isfinite(grad)))


def test_softmax_head_is_affine():
    head = _filled(lambda: SoftmaxHead(6, 4, rngs=nnx.Rngs(2)))
    x = _emb((3, 6), 1)
    xn = np.asarray(x, np.float64)
    ref = xn @ _np(head.linear.kernel) + _np(head.linear.bias)
    # float32 vs float64 (case 2): 6 products + the bias; scale: each output's sum of |terms|
    assert_close(head(x), ref, terms=6 + 1,
                 scale=np.abs(xn) @ np.abs(_np(head.linear.kernel)) + np.abs(_np(head.linear.bias)))


def test_landmark_head_shapes_and_pooling():
    head = _filled(lambda: LandmarkHead(8, rngs=nnx.Rngs(3)))
    emb = _emb((2, 8), 2)
    out = head(emb)
    assert out.shape == (2, 5, 2)
    ref = np.asarray(emb, np.float64) @ _np(head.linear.kernel) + _np(head.linear.bias)
    # float32 vs float64 (case 2): 8 products + the bias; scale max|ref|
    assert_close(out, ref.reshape(2, 5, 2), terms=8 + 1)
    fmap = _emb((2, 3, 4, 8), 3)
    pooled = np.asarray(fmap, np.float64).mean(axis=(1, 2))
    ref = pooled @ _np(head.linear.kernel) + _np(head.linear.bias)
    # float32 vs float64: the mean over 3 x 4 positions, then 8 products + the bias
    assert_close(head(fmap), ref.reshape(2, 5, 2), terms=3 * 4 + 8 + 1)
    head68 = nnx.eval_shape(lambda: LandmarkHead(8, num_points=68, rngs=nnx.Rngs(0)))
    assert jax.eval_shape(lambda h, e: h(e), head68, emb).shape == (2, 68, 2)


def test_heads_reject_bad_inputs():
    with pytest.raises(ValueError, match=r"\[B, 6\]"):
        MarginHead(6, 5, rngs=nnx.Rngs(0))(jnp.zeros((2, 7)))
    with pytest.raises(TypeError, match="float"):
        MarginHead(6, 5, rngs=nnx.Rngs(0))(jnp.zeros((2, 6), jnp.int32))
    with pytest.raises(ValueError, match="num_classes"):
        MarginHead(6, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[B, 6\]"):
        _filled(lambda: SoftmaxHead(6, 5, rngs=nnx.Rngs(0)))(jnp.zeros((6,)))
    with pytest.raises(ValueError, match="LandmarkHead"):
        _filled(lambda: LandmarkHead(8, rngs=nnx.Rngs(0)))(jnp.zeros((2, 3, 8)))


# ---------------------------------------------------------------- adapters

def _np_adapter(adapter, x_resized):
    """1x1 conv (no bias) + eval-mode BN in float64."""
    h = np.einsum("bhwc,co->bhwo", x_resized, _np(adapter.conv.kernel)[0, 0])
    bn = adapter.bn
    return ((h - _np(bn.mean)) / np.sqrt(_np(bn.var) + 1e-5) * _np(bn.scale) + _np(bn.bias))


def test_conv_adapter_same_size():
    adapter = _filled(lambda: ConvAdapter(6, 10, rngs=nnx.Rngs(0)))
    adapter.eval()
    x = _emb((2, 5, 5, 6))
    # float32 vs float64 (case 2): a 1x1 conv over 6 channels, then BN's few roundings (+3)
    assert_close(adapter(x), _np_adapter(adapter, np.asarray(x, np.float64)), terms=6 + 3)


def test_conv_adapter_integer_downsample_is_block_average():
    adapter = _filled(lambda: ConvAdapter(4, 8, out_hw=(2, 3), rngs=nnx.Rngs(1)))
    adapter.eval()
    x = _emb((2, 4, 6, 4), 4)
    xn = np.asarray(x, np.float64)
    pooled = np.zeros((2, 2, 3, 4))
    for i in range(2):
        for j in range(3):
            pooled[:, i, j] = xn[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
    out = adapter(x)
    assert out.shape == (2, 2, 3, 8)
    # float32 vs float64: the 2x2 block average (4 terms), a 1x1 conv over 4 channels, BN (+3)
    assert_close(out, _np_adapter(adapter, pooled), terms=4 + 4 + 3)


def test_resize_features_non_integer_and_upsample():
    x = _emb((1, 7, 7, 3), 5)
    assert resize_features(x, (4, 4)).shape == (1, 4, 4, 3)
    up = resize_features(x, (14, 14))
    assert up.shape == (1, 14, 14, 3)
    # Constant maps stay constant under any of the resizes.
    c = jnp.full((1, 7, 7, 3), 2.5)
    for hw in [(4, 4), (14, 14), (7, 1)]:
        # vs the exact 2.5: an interpolation's weights sum to 1 in at most 7 x 7 taps (the
        # (7, 1) resize averages a whole row), scale 2.5
        assert_close(resize_features(c, hw), np.full((1, *hw, 3), 2.5), terms=7 * 7, scale=2.5)
    assert resize_features(x, (7, 7)) is x
    with pytest.raises(ValueError, match="feature map"):
        resize_features(x[0], (4, 4))


def test_linear_adapter():
    adapter = _filled(lambda: LinearAdapter(128, 512, rngs=nnx.Rngs(0)))
    x = _emb((3, 128), 6)
    out = adapter(x)
    assert out.shape == (3, 512)
    xn = np.asarray(x, np.float64)
    # float32 vs float64 (case 2): 128 products per output; scale: each output's sum |x||w|
    assert_close(out, xn @ _np(adapter.linear.kernel), terms=128,
                 scale=np.abs(xn) @ np.abs(_np(adapter.linear.kernel)))
    with pytest.raises(ValueError, match=r"\[B, 128\]"):
        adapter(jnp.zeros((3, 64)))
    with pytest.raises(ValueError, match="ConvAdapter"):
        _filled(lambda: ConvAdapter(4, 8, rngs=nnx.Rngs(0)))(jnp.zeros((1, 3, 3, 5)))


def test_stage_adapters_map_student_to_teacher_and_teacher_tail():
    # ShrinkTeaNet (Duong et al. 2019 eq. 6): teacher.forward_from(i, G_i(student stage i)).
    hw = (32, 32)
    student = concrete_model("sphereface36_thin", input_size=hw)
    teacher = concrete_model("iresnet18", seed=1, input_size=hw)
    adapters = _filled(lambda: stage_adapters(student, teacher, hw, rngs=nnx.Rngs(2)))
    assert len(adapters) == 4
    adapters.eval()
    x = _emb((2, *hw, 3), 7)
    _, s_stages = student(x, return_stages=True)
    t_shapes = teacher.stage_shapes(hw)
    for i in range(4):
        mapped = adapters[i](s_stages[i])
        assert tuple(mapped.shape[1:]) == t_shapes[i]
        assert teacher.forward_from(i, mapped).shape == (2, 512)


def test_stage_adapters_resize_when_spatial_sizes_differ():
    student = abstract_model("sphereface36_thin", input_size=(112, 96))
    teacher = abstract_model("iresnet50")
    adapters = nnx.eval_shape(lambda: stage_adapters(
        student, teacher, (112, 96), teacher_input_hw=(112, 112), rngs=nnx.Rngs(0)))
    for adapter, (h, w, c), s in zip(adapters, teacher.stage_shapes(),
                                     student.stage_shapes((112, 96))):
        assert adapter.out_hw == (h, w)
        out = jax.eval_shape(lambda a, f: a(f), adapter,
                             jax.ShapeDtypeStruct((2, *s), jnp.float32))
        assert out.shape == (2, h, w, c)
