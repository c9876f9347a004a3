"""Convolutions that train fast on the CPU; XLA's convolution everywhere else.

:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature (``nnx.Conv`` takes it
as its ``conv_general_dilated``), returns the same values and the same gradients, and differs
only in how XLA computes the gradients on the CPU backend for three NHWC cases: pointwise (1x1,
unpadded, one group: the expansion / projection layers of mobile networks), depthwise (one input
channel per group, any channel multiplier: the MobileNet / MobileFaceNet layer) and grouped
(several input channels per group: VarGFaceNet's ``S = 8``).

Why: XLA:CPU runs a depthwise convolution on one core, computes its input gradient as a grouped
transposed convolution (slow for stride 2), and computes the *weight* gradient of a grouped
convolution as a full ``C_in x C_out`` convolution masked to the group-diagonal blocks: ``G``
times the work needed (``C`` times for depthwise). A 1x1 convolution's weight gradient becomes a
convolution with an ``H x W`` window, several times slower than the equivalent matrix product.

* Pointwise: forward and both gradients are those of one matrix product ``[B*H*W, C_in] @
  [C_in, C_out]`` (after the stride's subsampling).
* Depthwise: the forward pass is the sum over the ``K*K`` kernel taps of the strided, shifted
  input times that tap's per-channel weight (``y = sum_ij x[s*h+i, s*w+j, c] * w[i, j, c]``),
  which XLA fuses into one parallel elementwise loop; the input gradient is the automatic
  derivative of that sum (shifted, zero-padded copies of ``g * w[i, j]``, one fused loop); the
  weight gradient is the per-channel reduction ``dw[i, j, c] = sum_{b,h,w} x[b, s*h+i, s*w+j, c]
  g[b, h, w, c]``, one variadic reduction over the batch for all ``K*K`` taps in a single pass
  over ``x`` and ``g``, then a small reduction over space.
* Grouped: forward and input gradient stay XLA's; the weight gradient is, per tap, one batched
  matrix product over the groups (``[G, S, N] @ [G, N, M]``, ``N = B*H'*W'``).

The primal of each ``custom_vjp`` stays ``lax.conv_general_dilated``: a traced forward pass (ONNX
export, ``count_macs``, an un-differentiated evaluation) sees one convolution per layer as
before; the fast formulations run where the training step differentiates the layer. GPUs and
TPUs, KxK regular convolutions, dilations and ``batch_group_count`` keep XLA's convolution.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kdface._platform import target_platform

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                 precision=None, preferred_element_type=None, out_sharding=None):
    """``lax.conv_general_dilated`` with CPU-fast gradients for pointwise, depthwise and grouped
    NHWC convolutions.

    Same arguments and result as ``lax.conv_general_dilated``; see the module docstring for
    which calls take the fast path (every other call is passed through unchanged). ``precision``
    does not apply on the fast path (the CPU computes float32 exactly as requested).
    """
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                  dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                  batch_group_count=batch_group_count, precision=precision,
                  preferred_element_type=preferred_element_type)
    if out_sharding is not None:
        kwargs["out_sharding"] = out_sharding
    kind = _fast_kind(lhs, rhs, kwargs)
    if kind is None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if kind == "pointwise" and any(pads[0] + pads[1]):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    if kind == "pointwise":
        return _pointwise_conv(lhs, rhs, strides)
    if kind == "depthwise":
        return _depthwise_conv(lhs, rhs, strides, pads)
    return _grouped_conv(lhs, rhs, strides, pads, feature_group_count)


def _fast_kind(lhs, rhs, kwargs) -> str | None:
    """``'pointwise'`` (1x1, one group), ``'depthwise'`` (one input channel per group),
    ``'grouped'`` (several) or ``None`` (a call left to XLA: another backend, layout, dilation, a
    regular KxK convolution, ...)."""
    if target_platform() != "cpu" or lhs.ndim != 4 or rhs.ndim != 4:
        return None
    if (kwargs["batch_group_count"] != 1 or kwargs["preferred_element_type"] is not None
            or kwargs.get("out_sharding") is not None):
        return None
    if any(d not in (None, 1) and tuple(d) != (1, 1)
           for d in (kwargs["lhs_dilation"], kwargs["rhs_dilation"])):
        return None
    numbers = kwargs["dimension_numbers"]
    if numbers is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, numbers) != (
            lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return None
    groups, channels = kwargs["feature_group_count"], lhs.shape[3]
    if groups == 1 and tuple(rhs.shape[:2]) == (1, 1):
        return "pointwise"
    if groups < 2 or not isinstance(channels, int) or channels % groups:
        return None
    if rhs.shape[2] != channels // groups or rhs.shape[3] % groups:
        return None
    return "depthwise" if groups == channels else "grouped"


def _reference(x, kernel, strides, pads, groups=None):
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC,
                                    feature_group_count=groups or x.shape[3])


def _output_hw(x_shape, kernel_shape, strides, pads):
    return tuple((x_shape[1 + a] + pads[a][0] + pads[a][1] - kernel_shape[a]) // strides[a] + 1
                 for a in range(2))


def _taps(x, kernel_shape, strides, pads):
    """``x`` padded, then for each kernel tap ``(i, j)`` (row-major) the strided window
    ``x_pad[:, s*h + i, s*w + j, :]`` of the output's spatial size: ``K*K`` x ``[B, Ho, Wo, C]``."""
    ho, wo = _output_hw(x.shape, kernel_shape, strides, pads)
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    (sh, sw), (kh, kw) = strides, kernel_shape[:2]
    return [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (ho - 1) * sh + 1,
                                         j + (wo - 1) * sw + 1, xp.shape[3]), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _accumulation_dtype(dtype):
    # bf16 / f16 products are summed in float32, as XLA's own convolution does on the CPU.
    return jnp.promote_types(dtype, jnp.float32)


def _depthwise_forward(x, kernel, strides, pads):
    """Forward pass as a sum over taps: ``[B, H, W, C] x [kh, kw, 1, C*M] -> [B, Ho, Wo, C*M]``
    (output channel ``c*M + m`` reads input channel ``c``, the grouping of
    ``feature_group_count=C``)."""
    b, c = x.shape[0], x.shape[3]
    mult = kernel.shape[3] // c
    acc = _accumulation_dtype(x.dtype)
    w = kernel.astype(acc).reshape(kernel.shape[0] * kernel.shape[1], c, mult)
    out = None
    for k, tap in enumerate(_taps(x, kernel.shape, strides, pads)):
        term = tap.astype(acc)[..., None] * w[k].reshape(1, 1, 1, c, mult)
        out = term if out is None else out + term
    return out.reshape(b, out.shape[1], out.shape[2], c * mult).astype(x.dtype)


def _depthwise_weight_grad(x, g, kernel_shape, strides, pads):
    """``dw[i, j, 0, c*M + m] = sum_{b,h,w} x_pad[b, s*h+i, s*w+j, c] g[b, h, w, c*M + m]``.

    One variadic ``lax.reduce`` over the batch axis computes all ``K*K`` taps in a single pass
    (separate reductions would each materialize a shifted copy of ``x``); the ``[Ho, Wo]`` partial
    sums left per tap are small.
    """
    b, ho, wo, out_c = g.shape
    c = x.shape[3]
    mult = out_c // c
    acc = _accumulation_dtype(g.dtype)
    g5 = g.astype(acc).reshape(b, ho, wo, c, mult)
    products = tuple(tap.astype(acc)[..., None] * g5
                     for tap in _taps(x, kernel_shape, strides, pads))
    n = len(products)

    def add(a, b_):
        return tuple(a[k] + b_[k] for k in range(n))

    zeros = tuple(jnp.zeros((), acc) for _ in range(n))
    per_tap = lax.reduce(products, zeros, add, (0,))
    dw = jnp.sum(jnp.stack(per_tap), axis=(1, 2))  # [K*K, C, M]
    return dw.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_conv(x, kernel, strides, pads):
    return _reference(x, kernel, strides, pads)


def _depthwise_conv_fwd(x, kernel, strides, pads):
    return _depthwise_forward(x, kernel, strides, pads), (x, kernel)


def _depthwise_conv_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: _depthwise_forward(x_, kernel, strides, pads), x)
    (dx,) = input_vjp(g)
    dw = _depthwise_weight_grad(x, g, kernel.shape, strides, pads)
    return dx, dw.astype(kernel.dtype)


_depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def _grouped_weight_grad(x, g, kernel_shape, strides, pads, groups):
    """``dw[i, j, s, g*M + m] = sum_{b,h,w} x_pad[b, s*h+i, s*w+j, g*S + s] g[b, h, w, g*M + m]``
    (``S`` input and ``M`` output channels per group): per tap one batched matrix product over the
    groups, ``[G, S, N] @ [G, N, M]`` with ``N = B*H'*W'``."""
    b, ho, wo, out_c = g.shape
    s_in, mult = x.shape[3] // groups, out_c // groups
    acc = _accumulation_dtype(g.dtype)
    g3 = g.reshape(b * ho * wo, groups, mult)
    taps = [jnp.einsum("ngs,ngm->gsm", tap.reshape(b * ho * wo, groups, s_in), g3,
                       preferred_element_type=acc)
            for tap in _taps(x, kernel_shape, strides, pads)]
    dw = jnp.stack(taps).transpose(0, 2, 1, 3)  # [K*K, S, G, M]
    return dw.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _grouped_conv(x, kernel, strides, pads, groups):
    return _reference(x, kernel, strides, pads, groups)


def _grouped_conv_fwd(x, kernel, strides, pads, groups):
    return _reference(x, kernel, strides, pads, groups), (x, kernel)


def _grouped_conv_bwd(strides, pads, groups, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: _reference(x_, kernel, strides, pads, groups), x)
    (dx,) = input_vjp(g)
    dw = _grouped_weight_grad(x, g, kernel.shape, strides, pads, groups)
    return dx, dw.astype(kernel.dtype)


_grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)


def _pointwise_forward(x, kernel, strides):
    """A 1x1 convolution as one matrix product: ``[B*H'*W', C_in] @ [C_in, C_out]`` on the
    strided input (XLA:CPU computes a 1x1 convolution's weight gradient as a convolution with
    an ``H x W`` window, several times slower than this product)."""
    sh, sw = strides
    if (sh, sw) != (1, 1):
        x = lax.slice(x, (0, 0, 0, 0), x.shape, (1, sh, sw, 1))
    b, h, w, c = x.shape
    acc = _accumulation_dtype(x.dtype)
    y = lax.dot_general(x.reshape(b * h * w, c), kernel.reshape(c, kernel.shape[3]),
                        (((1,), (0,)), ((), ())), preferred_element_type=acc)
    return y.reshape(b, h, w, kernel.shape[3]).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise_conv(x, kernel, strides):
    return _reference(x, kernel, strides, ((0, 0), (0, 0)), 1)


def _pointwise_conv_fwd(x, kernel, strides):
    return _pointwise_forward(x, kernel, strides), (x, kernel)


def _pointwise_conv_bwd(strides, residuals, g):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x_, k_: _pointwise_forward(x_, k_, strides), x, kernel)
    return vjp(g)


_pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)
