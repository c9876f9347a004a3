"""ONNX network layers in JAX (the general ONNX teacher): Conv, pooling, BatchNormalization,
MatMul / Gemm, Quantize/DequantizeLinear, Resize, in ONNX's NCHW layout (XLA picks its own
physical layout). Conventions as in ``_onnx_array_ops``: ``f(inputs, attrs) -> outputs``, NumPy
inputs stay NumPy where the op allows (so int8 weights fold to float32 once, at load).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kdface.interop._onnx_array_ops import _const, _operands, _ranked, _xp

__all__ = ["LAYER_OPS", "dequantize"]


def op_matmul(ins, attrs):
    a, b = ins
    if np.ndim(a) > 2 and np.ndim(b) > 2 and np.ndim(a) != np.ndim(b):
        a, b = _ranked(a, b)
    a, b = _operands(a, b) if np.ndim(a) == np.ndim(b) else (a, b)
    return [_xp(a, b).matmul(a, b)]


def op_gemm(ins, attrs):
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    if attrs.get("transA", 0):
        a = a.T
    if attrs.get("transB", 0):
        b = b.T
    xp = _xp(a, b, c)
    a, b = _operands(a, b)
    y = xp.matmul(a, b)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y, c = _operands(y, c if beta == 1.0 else c * beta)
        y = y + c
    return [y]


def op_batch_norm(ins, attrs):
    """Inference form (``training_mode`` 0): ``scale * (x - mean) / sqrt(var + eps) + bias``
    over axis 1."""
    x, scale, bias, mean, var = ins[:5]
    if attrs.get("training_mode", 0):
        raise ValueError("BatchNormalization with training_mode=1")
    shape = (1, -1) + (1,) * (np.ndim(x) - 2)
    eps = attrs.get("epsilon", 1e-5)
    xp = _xp(*ins[:5])
    k = (scale / xp.sqrt(var + np.asarray(eps, var.dtype))).reshape(shape)
    x, k, m, b = _operands(x, k, mean.reshape(shape), bias.reshape(shape))
    return [(x - m) * k + b]


def _spatial(attrs, key, rank, default):
    v = attrs.get(key)
    return tuple(int(s) for s in v) if v else (default,) * rank


def _padding(attrs, in_hw, kernel, strides, dilations):
    """``[(lo, hi)]`` per spatial axis from ``pads`` or ``auto_pad``."""
    n = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for d, k, s, dl in zip(in_hw, kernel, strides, dilations):
            total = max((math.ceil(d / s) - 1) * s + (k - 1) * dl + 1 - d, 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            out.append((lo, total - lo))
        return out
    if auto == "VALID":
        return [(0, 0)] * n
    pads = attrs.get("pads") or (0,) * (2 * n)
    return [(int(pads[i]), int(pads[i + n])) for i in range(n)]


def op_conv(ins, attrs):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    n = np.ndim(w) - 2
    strides = _spatial(attrs, "strides", n, 1)
    dilations = _spatial(attrs, "dilations", n, 1)
    padding = _padding(attrs, np.shape(x)[2:], np.shape(w)[2:], strides, dilations)
    x = jnp.asarray(x)
    group = int(attrs.get("group", 1))
    w = jnp.asarray(w, x.dtype)
    if (n == 2 and group > 1 and group == x.shape[1] == w.shape[0] and w.shape[1] == 1
            and jax.default_backend() == "cpu"):
        y = _depthwise_by_shifts(x, w, strides, padding, dilations)
    else:
        spec = "NC" + "HWD"[:n]
        y = jax.lax.conv_general_dilated(
            x, w, strides, padding, rhs_dilation=dilations,
            dimension_numbers=(spec, "OI" + "HWD"[:n], spec), feature_group_count=group)
    if b is not None:
        y = y + jnp.asarray(b, y.dtype).reshape((1, -1) + (1,) * n)
    return [y]


def _depthwise_by_shifts(x, w, strides, padding, dilations):
    """A depthwise convolution (one filter per channel, ``w: [C, 1, kh, kw]``) as ``kh * kw``
    strided slices of the padded input times per-channel weights, summed. The same numbers as
    ``conv_general_dilated`` up to the summation order; on XLA:CPU, whose grouped convolutions
    are slow, measured here ~18x faster (32 x 128 x 28 x 28, 3x3: 8 ms against 143 ms), which
    makes mobile face networks (MobileFaceNet, SFace) usable as teachers on a CPU."""
    c, kh, kw = w.shape[0], w.shape[2], w.shape[3]
    (sh, sw), (dh, dw) = strides, dilations
    xp = jnp.pad(x, [(0, 0), (0, 0), tuple(padding[0]), tuple(padding[1])])
    oh = (xp.shape[2] - (kh - 1) * dh - 1) // sh + 1
    ow = (xp.shape[3] - (kw - 1) * dw - 1) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            part = jax.lax.slice(xp, (0, 0, i * dh, j * dw),
                                 (xp.shape[0], c, i * dh + (oh - 1) * sh + 1,
                                  j * dw + (ow - 1) * sw + 1), (1, 1, sh, sw))
            term = part * w[:, 0, i, j].reshape(1, c, 1, 1)
            out = term if out is None else out + term
    return out


def _pool(kind: str):
    def op(ins, attrs):
        x = jnp.asarray(ins[0])
        n = x.ndim - 2
        kernel = tuple(int(k) for k in attrs["kernel_shape"])
        strides = _spatial(attrs, "strides", n, 1)
        dilations = _spatial(attrs, "dilations", n, 1)
        padding = _padding(attrs, x.shape[2:], kernel, strides, dilations)
        if attrs.get("ceil_mode", 0):  # extra high padding so the last partial window counts
            padding = [(lo, hi + (-(d + lo + hi - ((k - 1) * dl + 1)) % s))
                       for (lo, hi), d, k, s, dl in zip(padding, x.shape[2:], kernel, strides,
                                                        dilations)]
        window, step = (1, 1) + kernel, (1, 1) + strides
        dil, pad = (1, 1) + dilations, [(0, 0), (0, 0)] + list(padding)
        if kind == "max":
            return [jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, step, pad,
                                          window_dilation=dil)]
        total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, step, pad,
                                      window_dilation=dil)
        if attrs.get("count_include_pad", 0):
            # padding explicitly asked for counts; the ceil_mode overhang does not
            plain = _padding(attrs, x.shape[2:], kernel, strides, dilations)
            ones = jnp.pad(jnp.ones((1, 1) + x.shape[2:], x.dtype),
                           [(0, 0), (0, 0)] + plain)
            extra = [(0, 0), (0, 0)] + [(0, hi - p[1]) for (lo, hi), p in zip(padding, plain)]
            count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, step, extra,
                                          window_dilation=dil)
        else:
            count = jax.lax.reduce_window(jnp.ones((1, 1) + x.shape[2:], x.dtype), 0.0,
                                          jax.lax.add, window, step, pad, window_dilation=dil)
        return [total / count]
    return op


def op_global_average_pool(ins, attrs):
    x = ins[0]
    return [x.mean(axis=tuple(range(2, np.ndim(x))), keepdims=True)]


def op_global_max_pool(ins, attrs):
    x = ins[0]
    return [x.max(axis=tuple(range(2, np.ndim(x))), keepdims=True)]


def _quant_axis_shape(x_shape, scale, axis, block):
    """``scale`` (or a zero point) broadcastable to ``x``: a scalar (per tensor), ``[C]`` along
    ``axis`` (per axis), or blocked (opset 21: ``scale`` has ``x``'s rank with
    ``ceil(x.shape[axis] / block)`` along ``axis``, each entry covering ``block`` elements)."""
    scale = np.asarray(scale) if _const(scale) else scale
    if np.ndim(scale) == 0:
        return scale
    axis = axis % len(x_shape)
    if block:
        xp = _xp(scale)
        rep = xp.repeat(scale, block, axis=axis)
        return rep[(slice(None),) * axis + (slice(0, x_shape[axis]),)]
    shape = [1] * len(x_shape)
    shape[axis] = -1
    return scale.reshape(shape)


def dequantize(x, scale, zero_point=None, *, axis: int = 1, block_size: int = 0):
    """``DequantizeLinear``: ``(x - zero_point) * scale`` in float32."""
    s = _quant_axis_shape(np.shape(x), scale, axis, block_size)
    y = x.astype(np.float32)
    if zero_point is not None:
        y = y - _quant_axis_shape(np.shape(x), zero_point, axis, block_size).astype(np.float32)
    return y * s.astype(np.float32)


def op_dequantize_linear(ins, attrs):
    zp = ins[2] if len(ins) > 2 else None
    return [dequantize(ins[0], ins[1], zp, axis=attrs.get("axis", 1),
                       block_size=attrs.get("block_size", 0))]


def op_quantize_linear(ins, attrs):
    """``saturate(round_half_even(x / scale) + zero_point)`` to the zero point's dtype (uint8
    without one)."""
    x, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 else None
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    dtype = np.asarray(zp).dtype if zp is not None else np.dtype(np.uint8)
    xp = _xp(x, scale, zp)
    s = _quant_axis_shape(np.shape(x), scale, axis, block)
    y = xp.round(x / s)
    if zp is not None:
        y = y + _quant_axis_shape(np.shape(x), zp, axis, block).astype(y.dtype)
    info = np.iinfo(dtype)
    return [xp.clip(y, info.min, info.max).astype(dtype)]


def op_resize(ins, attrs):
    """Nearest or (bi)linear resize to ``sizes`` or ``scales`` (half-pixel coordinates), the
    forms face-model exporters write for upsampling."""
    x = jnp.asarray(ins[0])
    sizes = ins[3] if len(ins) > 3 and ins[3] is not None and np.size(ins[3]) else None
    if sizes is None:
        scales = np.asarray(ins[2] if len(ins) > 2 else ins[1]).reshape(-1)
        sizes = [int(math.floor(d * s)) for d, s in zip(x.shape, scales)]
    mode = attrs.get("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    method = {"nearest": "nearest", "linear": "linear", "cubic": "cubic"}[mode]
    return [jax.image.resize(x, tuple(int(s) for s in np.asarray(sizes).reshape(-1)), method)]


LAYER_OPS: dict[str, Callable[[list, dict], list]] = {
    "MatMul": op_matmul, "Gemm": op_gemm, "BatchNormalization": op_batch_norm,
    "Conv": op_conv, "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": op_global_average_pool, "GlobalMaxPool": op_global_max_pool,
    "DequantizeLinear": op_dequantize_linear, "QuantizeLinear": op_quantize_linear,
    "Resize": op_resize,
}
