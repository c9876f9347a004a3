"""ONNX elementwise, shape and reduction operators in JAX / NumPy (the general ONNX teacher).

Each op is ``f(inputs, attrs) -> outputs``. An input is a NumPy array when its value is known
without the image (weights, shapes: JAX shapes are static under ``jit``, so ``Shape -> Gather ->
Concat -> Reshape`` chains stay NumPy) or a JAX array; an op whose inputs are all NumPy computes
in NumPy (``_xp``), which is also how the loader folds the weight-only part of a graph once. A
missing input (an empty name) is None; ``attrs`` holds the node's attributes (lists as tuples).

Broadcasting follows ONNX (NumPy's rules); ranks are equalized explicitly (``_ranked``), so the
ops run under ``jax_numpy_rank_promotion='raise'``. Semantics are those of the ONNX operator
specification (https://onnx.ai/onnx/operators/), the opset noted where an op changed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ARRAY_OPS"]


def _const(*xs) -> bool:
    return all(x is None or isinstance(x, (np.ndarray, np.generic)) for x in xs)


def _xp(*xs):
    return np if _const(*xs) else jnp


def _ranked(*xs):
    """The operands with leading size-1 axes added to equal ranks (ONNX multidirectional
    broadcasting; explicit, so JAX's rank promotion may stay 'raise')."""
    rank = max(np.ndim(x) for x in xs)
    out = []
    for x in xs:
        if np.ndim(x) < rank:
            x = x.reshape((1,) * (rank - np.ndim(x)) + tuple(np.shape(x)))
        out.append(x)
    return out


def _operands(*xs):
    """Binary-op operands: NumPy constants take a JAX operand's dtype (an ONNX graph's constants
    have the dtype of the tensor they meet; this keeps a bfloat16 teacher in bfloat16)."""
    if not _const(*xs):
        dtype = next(x.dtype for x in xs if isinstance(x, jax.Array))
        xs = [x.astype(dtype) if isinstance(x, (np.ndarray, np.generic))
              and np.issubdtype(x.dtype, np.floating) and jnp.issubdtype(dtype, jnp.floating)
              else x for x in xs]
    return _ranked(*xs)


def _binary(name: str):
    def op(ins, attrs):
        a, b = _operands(ins[0], ins[1])
        xp = _xp(a, b)
        if name == "Div" and np.issubdtype(np.asarray(a).dtype if _const(a) else a.dtype,
                                           np.integer):
            return [xp.floor_divide(a, b) if xp is np else jnp.floor_divide(a, b)]
        return [getattr(xp, _NUMPY_BINARY[name])(a, b)]
    return op


_NUMPY_BINARY = {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Div": "divide",
                 "Pow": "power", "Equal": "equal", "Less": "less", "Greater": "greater",
                 "LessOrEqual": "less_equal", "GreaterOrEqual": "greater_equal",
                 "And": "logical_and", "Or": "logical_or"}


def _variadic(name: str):
    def op(ins, attrs):
        xs = _operands(*ins)
        xp = _xp(*xs)
        out = xs[0]
        for x in xs[1:]:
            out = getattr(xp, name)(out, x)
        return [out]
    return op


def _unary(fn_np, fn_jnp):
    def op(ins, attrs):
        x = ins[0]
        return [fn_np(x) if _const(x) else fn_jnp(x)]
    return op


def _sigmoid_np(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


def op_leaky_relu(ins, attrs):
    x, alpha = ins[0], attrs.get("alpha", 0.01)
    return [_xp(x).where(x >= 0, x, x * alpha)]


def op_prelu(ins, attrs):
    x, slope = _operands(ins[0], ins[1])
    return [_xp(x, slope).where(x >= 0, x, x * slope)]


def op_clip(ins, attrs):
    x = ins[0]
    low = ins[1] if len(ins) > 1 and ins[1] is not None else attrs.get("min")
    high = ins[2] if len(ins) > 2 and ins[2] is not None else attrs.get("max")
    xp = _xp(x)
    if low is not None:
        x = xp.maximum(x, np.asarray(low, np.asarray(low).dtype).astype(x.dtype))
    if high is not None:
        x = xp.minimum(x, np.asarray(high).astype(x.dtype))
    return [x]


def op_hard_sigmoid(ins, attrs):
    x = ins[0]
    xp = _xp(x)
    return [xp.clip(x * attrs.get("alpha", 0.2) + attrs.get("beta", 0.5), 0.0, 1.0)]


def op_hard_swish(ins, attrs):
    x = ins[0]
    return [x * _xp(x).clip(x / 6.0 + 0.5, 0.0, 1.0)]


def op_softmax(ins, attrs):
    x, axis = ins[0], attrs.get("axis", -1)
    if _const(x):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return [e / e.sum(axis=axis, keepdims=True)]
    return [jax.nn.softmax(x, axis=axis)]


def op_identity(ins, attrs):
    return [ins[0]]


def op_dropout(ins, attrs):
    """Inference: the identity (``training_mode`` absent or false); the mask, if asked, ones."""
    x = ins[0]
    return [x, _xp(x).ones(x.shape, bool)]


def op_cast(ins, attrs):
    from onnx import helper
    dtype = helper.tensor_dtype_to_np_dtype(attrs["to"])
    return [ins[0].astype(dtype)]


def op_shape(ins, attrs):
    shape = np.asarray(np.shape(ins[0]), np.int64)
    start, end = attrs.get("start", 0), attrs.get("end")
    return [shape[start:end]]


def op_gather(ins, attrs):
    x, idx = ins
    axis = attrs.get("axis", 0)
    xp = _xp(x, idx)
    if _const(idx):
        idx = np.where(idx < 0, idx + np.shape(x)[axis], idx)
    return [xp.take(x, idx, axis=axis)]


def _axes(ins, attrs, index=1):
    if len(ins) > index and ins[index] is not None:
        return tuple(int(a) for a in np.asarray(ins[index]).reshape(-1))
    a = attrs.get("axes")
    return None if a is None else tuple(int(v) for v in a)


def op_unsqueeze(ins, attrs):  # axes: attribute before opset 13, input since
    x, axes = ins[0], _axes(ins, attrs)
    rank = np.ndim(x) + len(axes)
    axes = sorted(a % rank for a in axes)
    shape = list(np.shape(x))
    for a in axes:
        shape.insert(a, 1)
    return [x.reshape(shape)]


def op_squeeze(ins, attrs):
    x, axes = ins[0], _axes(ins, attrs)
    shape = np.shape(x)
    if axes is None:
        axes = tuple(i for i, d in enumerate(shape) if d == 1)
    axes = {a % len(shape) for a in axes}
    return [x.reshape([d for i, d in enumerate(shape) if i not in axes])]


def op_flatten(ins, attrs):
    x = ins[0]
    shape = np.shape(x)
    axis = attrs.get("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    return [x.reshape(int(np.prod(shape[:axis])), int(np.prod(shape[axis:])))]


def reshape_target(shape, target, allowzero: int = 0):
    """ONNX Reshape's output shape: 0 copies the input's dimension (unless ``allowzero``), -1 is
    inferred."""
    out = [int(d) for d in np.asarray(target).reshape(-1)]
    if not allowzero:
        out = [shape[i] if d == 0 else d for i, d in enumerate(out)]
    return out


def op_reshape(ins, attrs):
    x, target = ins
    if not _const(target):
        raise ValueError("Reshape to a shape computed from image values")
    return [x.reshape(reshape_target(np.shape(x), target, attrs.get("allowzero", 0)))]


def op_transpose(ins, attrs):
    x = ins[0]
    perm = attrs.get("perm") or tuple(reversed(range(np.ndim(x))))
    return [_xp(x).transpose(x, perm)]


def op_concat(ins, attrs):
    xs = [x for x in ins if x is not None]
    if not _const(*xs):
        xs = [jnp.asarray(x) for x in xs]
    return [_xp(*xs).concatenate(xs, axis=attrs["axis"])]


def op_split(ins, attrs):
    x = ins[0]
    axis = attrs.get("axis", 0) % np.ndim(x)
    sizes = (np.asarray(ins[1]).reshape(-1).tolist() if len(ins) > 1 and ins[1] is not None
             else attrs.get("split"))
    n = attrs.get("_outputs", 1)
    if sizes is None:
        dim = np.shape(x)[axis]
        n = attrs.get("num_outputs", n)
        each = -(-dim // n)
        sizes = [min(each, dim - i * each) for i in range(n)]
    cuts = np.cumsum(sizes)[:-1].tolist()
    return list(_xp(x).split(x, cuts, axis=axis))


def op_slice(ins, attrs):
    x = ins[0]
    if len(ins) > 1:  # opset >= 10: inputs
        starts, ends = np.asarray(ins[1]).reshape(-1), np.asarray(ins[2]).reshape(-1)
        axes = (np.asarray(ins[3]).reshape(-1) if len(ins) > 3 and ins[3] is not None
                else np.arange(len(starts)))
        steps = (np.asarray(ins[4]).reshape(-1) if len(ins) > 4 and ins[4] is not None
                 else np.ones(len(starts), np.int64))
    else:
        starts, ends = np.asarray(attrs["starts"]), np.asarray(attrs["ends"])
        axes = np.asarray(attrs.get("axes", range(len(starts))))
        steps = np.ones(len(starts), np.int64)
    index = [slice(None)] * np.ndim(x)
    for s, e, a, st in zip(starts, ends, axes, steps):
        dim = np.shape(x)[int(a)]
        s, e, st = int(s), int(e), int(st)
        # ONNX clamps out-of-range bounds (INT64_MAX means "to the end")
        s = max(min(s + dim if s < 0 else s, dim - (st < 0)), 0)
        e = e + dim if e < 0 else e
        e = max(min(e, dim), -1 if st < 0 else 0)
        index[int(a)] = slice(s, None if e < 0 else e, st)
    return [x[tuple(index)]]


def op_pad(ins, attrs):
    x = ins[0]
    if len(ins) > 1 and ins[1] is not None:  # opset >= 11
        pads = np.asarray(ins[1]).reshape(-1).tolist()
        value = ins[2] if len(ins) > 2 and ins[2] is not None else 0
        axes = _axes(ins, attrs, index=3)
    else:
        pads, value, axes = list(attrs["pads"]), attrs.get("value", 0.0), None
    rank = np.ndim(x)
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    width = [(0, 0)] * rank
    for i, a in enumerate(axes):
        width[a] = (int(pads[i]), int(pads[i + len(axes)]))
    if any(lo < 0 or hi < 0 for lo, hi in width):
        raise ValueError("Pad with negative pads (cropping)")
    mode = attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    xp = _xp(x)
    if mode == "constant":
        return [xp.pad(x, width, constant_values=np.asarray(value).reshape(()).item())]
    if mode in ("reflect", "edge"):
        return [xp.pad(x, width, mode=mode)]
    raise ValueError(f"Pad mode {mode!r}")


def op_expand(ins, attrs):
    x, shape = ins
    target = tuple(int(d) for d in np.asarray(shape).reshape(-1))
    if len(target) > np.ndim(x):
        x = x.reshape((1,) * (len(target) - np.ndim(x)) + tuple(np.shape(x)))
    return [_xp(x).broadcast_to(x, np.broadcast_shapes(np.shape(x), target))]


def op_constant_of_shape(ins, attrs):
    from onnx import numpy_helper
    value = attrs.get("value")
    value = np.zeros(1, np.float32) if value is None else numpy_helper.to_array(value)
    return [np.full([int(d) for d in np.asarray(ins[0]).reshape(-1)], value.reshape(-1)[0],
                    value.dtype)]


def op_range(ins, attrs):
    start, limit, delta = (np.asarray(v).reshape(()) for v in ins)
    return [np.arange(start, limit, delta, dtype=start.dtype)]


def op_where(ins, attrs):
    c, a, b = _operands(*ins)
    return [_xp(c, a, b).where(c, a, b)]


def _reduce(name: str):
    def op(ins, attrs):
        x = ins[0]
        axes = _axes(ins, attrs)
        if axes is None or len(axes) == 0:
            if attrs.get("noop_with_empty_axes", 0) and axes is not None:
                return [x]
            axes = tuple(range(np.ndim(x)))
        keep = bool(attrs.get("keepdims", 1))
        xp = _xp(x)
        if name == "ReduceL2":
            return [xp.sqrt(xp.sum(x * x, axis=axes, keepdims=keep))]
        if name == "ReduceSumSquare":
            return [xp.sum(x * x, axis=axes, keepdims=keep)]
        fn = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min",
              "ReduceProd": "prod"}[name]
        return [getattr(xp, fn)(x, axis=axes, keepdims=keep)]
    return op


def op_lp_normalization(ins, attrs):
    x, axis, p = ins[0], attrs.get("axis", -1), attrs.get("p", 2)
    xp = _xp(x)
    norm = (xp.sum(xp.abs(x), axis=axis, keepdims=True) if p == 1
            else xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True)))
    return [x / norm]


ARRAY_OPS: dict[str, Callable[[list, dict], list]] = {
    **{name: _binary(name) for name in _NUMPY_BINARY},
    "Max": _variadic("maximum"), "Min": _variadic("minimum"), "Sum": _variadic("add"),
    "Relu": _unary(lambda x: np.maximum(x, 0).astype(x.dtype), jax.nn.relu),
    "Sigmoid": _unary(_sigmoid_np, jax.nn.sigmoid),
    "Tanh": _unary(np.tanh, jnp.tanh),
    "Exp": _unary(np.exp, jnp.exp), "Log": _unary(np.log, jnp.log),
    "Sqrt": _unary(np.sqrt, jnp.sqrt), "Neg": _unary(np.negative, jnp.negative),
    "Abs": _unary(np.abs, jnp.abs), "Floor": _unary(np.floor, jnp.floor),
    "Ceil": _unary(np.ceil, jnp.ceil), "Not": _unary(np.logical_not, jnp.logical_not),
    "Reciprocal": _unary(lambda x: (1 / x).astype(x.dtype), jnp.reciprocal),
    "Erf": _unary(lambda x: np.vectorize(math.erf)(x).astype(x.dtype), jax.scipy.special.erf),
    "Softplus": _unary(lambda x: np.log1p(np.exp(x)), jax.nn.softplus),
    "LeakyRelu": op_leaky_relu, "PRelu": op_prelu, "Clip": op_clip,
    "HardSigmoid": op_hard_sigmoid, "HardSwish": op_hard_swish, "Softmax": op_softmax,
    "Identity": op_identity, "Dropout": op_dropout, "Cast": op_cast,
    "Shape": op_shape, "Gather": op_gather, "Unsqueeze": op_unsqueeze, "Squeeze": op_squeeze,
    "Flatten": op_flatten, "Reshape": op_reshape, "Transpose": op_transpose,
    "Concat": op_concat, "Split": op_split, "Slice": op_slice, "Pad": op_pad,
    "Expand": op_expand, "ConstantOfShape": op_constant_of_shape, "Range": op_range,
    "Where": op_where,
    **{name: _reduce(name) for name in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
                                        "ReduceProd", "ReduceL2", "ReduceSumSquare")},
    "LpNormalization": op_lp_normalization,
}
