"""ONNX translations of JAX primitives: the op table of the jaxpr exporter (``_onnx_export``).

``OPS`` maps a primitive name to its translation ``(graph, eqn, ins) -> [values]``, which
receives the :class:`~kdface.interop._onnx_graph.GraphBuilder` and the translated inputs
(``Value``: an ONNX tensor or a NumPy constant, with its physical axis order and pending
broadcasts). Constant-only equations never get here (the exporter folds them). A primitive
missing from ``OPS`` is reported by name.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kdface.interop._onnx_graph import (GraphBuilder, UnsupportedExportError, Value,
                                        broadcast_shape, identity, preferred_perm, same_dim)

_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
           "pow": "Pow", "ge": "GreaterOrEqual", "gt": "Greater", "le": "LessOrEqual",
           "lt": "Less", "eq": "Equal", "and": "And", "or": "Or", "rem": "Mod"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid",
          "sqrt": "Sqrt", "abs": "Abs", "sign": "Sign", "erf": "Erf", "floor": "Floor",
          "ceil": "Ceil", "not": "Not", "sin": "Sin", "cos": "Cos"}
# Identity at inference: copies, autodiff and rematerialization markers, and reduce_precision
# (the exported graph computes in the network's float32 throughout).
_PASS = ("copy", "copy_p", "optimization_barrier", "stop_gradient", "reduce_precision")


def _layout(ins: list[Value], rank: int) -> tuple[int, ...]:
    for v in ins:
        if v.const is None and len(v.shape) == rank:
            return v.perm
    return identity(rank)


def _operand_dtype(ins: list[Value]):
    for v in ins:
        if v.const is None:
            return v.dtype
    return ins[0].dtype


def _broadcasting_node(t, op: str, ins: list[Value], aval, dtypes=None, **attrs) -> Value:
    """An ONNX op with numpy broadcasting over ``ins`` laid out alike; pending broadcasts stay."""
    rank = len(aval.shape)
    perm = _layout(ins, rank)
    names = []
    for i, v in enumerate(ins):
        if v.const is not None:
            c = v.const.astype(dtypes[i] if dtypes else v.dtype)
            names.append(t.initializer(np.transpose(c, perm) if c.ndim == rank and rank > 1
                                       else c))
        elif len(v.shape) == rank:
            names.append(t.tensor(v, perm))
        else:
            names.append(v.name)  # rank 0
    full_rank = [v.shape for v in ins if len(v.shape) == rank]
    shape = broadcast_shape(full_rank) if full_rank else tuple(aval.shape)
    out = t.node(op, names, **attrs)[0]
    return Value(shape, np.dtype(aval.dtype), perm, name=out)


def _same(v: Value, name: str, dtype=None) -> Value:
    return Value(v.shape, np.dtype(dtype) if dtype is not None else v.dtype, v.perm, name=name)


def _binary(onnx_op: str):
    """Binary arithmetic / comparison; literals take the other operand's dtype."""
    def translate(t, eqn, ins):
        dtypes = [_operand_dtype(ins)] * len(ins)
        return [_broadcasting_node(t, onnx_op, ins, eqn.outvars[0].aval, dtypes)]
    return translate


def _unary(onnx_op: str):
    def translate(t, eqn, ins):
        return [_same(ins[0], t.node(onnx_op, [ins[0].name])[0], eqn.outvars[0].aval.dtype)]
    return translate


def _passthrough(t, eqn, ins):
    return ins[:len(eqn.outvars)]


def op_ne(t, eqn, ins):
    dtypes = [_operand_dtype(ins)] * len(ins)
    eq = _broadcasting_node(t, "Equal", ins, eqn.outvars[0].aval, dtypes)
    return [Value(eq.shape, eq.dtype, eq.perm, name=t.node("Not", [eq.name])[0])]


def op_convert_element_type(t, eqn, ins):
    (v,) = ins
    new = np.dtype(eqn.params["new_dtype"])
    if new == v.dtype:
        return [v]
    return [_same(v, t.node("Cast", [v.name], to=t.onnx_type(new))[0], new)]


def op_rsqrt(t, eqn, ins):
    return [_same(ins[0], t.node("Reciprocal", t.node("Sqrt", [ins[0].name]))[0])]


def op_square(t, eqn, ins):
    x = ins[0].name
    return [_same(ins[0], t.node("Mul", [x, x])[0])]


def op_integer_pow(t, eqn, ins):
    (v,) = ins
    y = int(eqn.params["y"])
    if y == 1:
        return [v]
    if y == 2:
        return op_square(t, eqn, ins)
    if y == -1:
        return [_same(v, t.node("Reciprocal", [v.name])[0])]
    return [_same(v, t.node("Pow", [v.name, t.initializer(np.asarray(y, v.dtype))])[0])]


def op_log1p(t, eqn, ins):
    (v,) = ins
    one = t.initializer(np.asarray(1, v.dtype))
    return [_same(v, t.node("Log", t.node("Add", [v.name, one]))[0])]


def op_expm1(t, eqn, ins):
    (v,) = ins
    one = t.initializer(np.asarray(1, v.dtype))
    return [_same(v, t.node("Sub", [t.node("Exp", [v.name])[0], one])[0])]


def op_select_n(t, eqn, ins):
    pred, *cases = ins
    if len(cases) == 1:
        return [cases[0]]
    if len(cases) != 2:
        raise UnsupportedExportError(f"select_n with {len(cases)} cases")
    if pred.const is None and pred.dtype != np.bool_:
        pred = _same(pred, t.node("Cast", [pred.name], to=t.onnx_type(np.bool_))[0], np.bool_)
    dtype = _operand_dtype(cases)
    out = _broadcasting_node(t, "Where", [pred, cases[1], cases[0]], eqn.outvars[0].aval,
                             [np.bool_, dtype, dtype])
    return [out]


def op_clamp(t, eqn, ins):
    low, x, high = ins
    aval = eqn.outvars[0].aval
    dtypes = [x.dtype] * 2
    upper = _broadcasting_node(t, "Min", [x, high], aval, dtypes)
    return [_broadcasting_node(t, "Max", [upper, low], aval, dtypes)]


def _reshaped(t, v: Value, in_shape, out_shape) -> Value:
    v = t.full(v, tuple(in_shape))
    dims = list(out_shape)
    symbolic = [i for i, d in enumerate(dims) if not isinstance(d, (int, np.integer))]
    if len(symbolic) == 1:  # -1 lets ONNX infer the batch; no Shape op needed
        target = [int(d) if i != symbolic[0] else -1 for i, d in enumerate(dims)]
        shape = t.initializer(np.asarray(target, np.int64), "shape")
    else:
        shape = t.shape_vector(dims)
    name = t.node("Reshape", [t.tensor(v, identity(len(in_shape))), shape])[0]
    return Value(tuple(out_shape), v.dtype, identity(len(out_shape)), name=name)


def op_reshape(t, eqn, ins):
    if eqn.params.get("dimensions") is not None:
        raise UnsupportedExportError("reshape with dimensions (a transposing reshape)")
    return [_reshaped(t, ins[0], eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)]


def op_expand_dims(t, eqn, ins):
    return [_reshaped(t, ins[0], eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)]


def _drop_axes(perm: tuple[int, ...], axes) -> tuple[int, ...]:
    axes = set(axes)
    return tuple(a - sum(1 for x in axes if x < a) for a in perm if a not in axes)


def op_squeeze(t, eqn, ins):
    v = t.full(ins[0], tuple(eqn.invars[0].aval.shape))
    dims = [d % len(v.shape) for d in eqn.params["dimensions"]]
    axes = t.initializer(np.asarray(sorted(v.perm.index(d) for d in dims), np.int64), "axes")
    name = t.node("Squeeze", [v.name, axes])[0]
    return [Value(tuple(eqn.outvars[0].aval.shape), v.dtype, _drop_axes(v.perm, dims),
                   name=name)]


def op_broadcast_in_dim(t, eqn, ins):
    """Adds the new axes as size 1 (``Unsqueeze``); the broadcast itself stays pending."""
    v = ins[0]
    out_shape = tuple(eqn.params["shape"])
    bd = tuple(eqn.params["broadcast_dimensions"])
    rank = len(out_shape)
    logical = [1] * rank
    for i, d in enumerate(bd):
        logical[d] = v.shape[i]
    if v.const is not None:
        order = sorted(range(len(bd)), key=lambda i: bd[i])
        c = np.transpose(v.const, order).reshape([int(d) for d in logical])
        return [Value(tuple(logical), v.dtype, identity(rank), const=c)]
    if len(v.shape) == rank and bd == identity(rank):
        return [Value(tuple(logical), v.dtype, v.perm, name=v.name)]
    target = preferred_perm(rank)
    kept = [a for a in target if a in bd]
    if kept != [bd[a] for a in v.perm]:
        target = identity(rank)
        source = tuple(sorted(range(len(bd)), key=lambda i: bd[i]))
        name = t.tensor(v, source)
    else:
        name = v.name
    axes = [i for i, a in enumerate(target) if a not in bd]
    name = t.node("Unsqueeze", [name, t.initializer(np.asarray(axes, np.int64), "axes")])[0]
    return [Value(tuple(logical), v.dtype, target, name=name)]


def op_transpose(t, eqn, ins):
    v = ins[0]
    p = tuple(eqn.params["permutation"])
    perm = tuple(p.index(a) for a in v.perm)
    return [Value(tuple(v.shape[i] for i in p), v.dtype, perm, name=v.name)]


def _reduce(t, eqn, ins, op: str):
    v = t.full(ins[0], tuple(eqn.invars[0].aval.shape))
    axes = tuple(eqn.params["axes"])
    phys = sorted(v.perm.index(a) for a in axes)
    if op == "ReduceSum":
        name = t.node(op, [v.name, t.initializer(np.asarray(phys, np.int64), "axes")],
                      keepdims=0)[0]
    else:  # opset 17: axes is an attribute of ReduceMax / ReduceMin
        name = t.node(op, [v.name], axes=phys, keepdims=0)[0]
    return [Value(tuple(eqn.outvars[0].aval.shape), v.dtype, _drop_axes(v.perm, axes),
                   name=name)]


def op_reduce_sum(t, eqn, ins):
    return _reduce(t, eqn, ins, "ReduceSum")


def op_reduce_max(t, eqn, ins):
    return _reduce(t, eqn, ins, "ReduceMax")


def op_reduce_min(t, eqn, ins):
    return _reduce(t, eqn, ins, "ReduceMin")


def op_dot_general(t, eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs = t.full(ins[0], tuple(eqn.invars[0].aval.shape))
    rhs = t.full(ins[1], tuple(eqn.invars[1].aval.shape))
    out_shape = tuple(eqn.outvars[0].aval.shape)
    lr, rr = len(lhs.shape), len(rhs.shape)
    if not lb and rr == 2 and tuple(lc) == (lr - 1,) and tuple(rc) in ((0,), (1,)):
        w = t.tensor(rhs, (0, 1) if tuple(rc) == (0,) else (1, 0))
        # Gemm for 2-D inputs: the bias and BatchNorm that follow fold into it.
        name = t.node("Gemm" if lr == 2 else "MatMul", [t.tensor(lhs, identity(lr)), w])[0]
        return [Value(out_shape, np.dtype(eqn.outvars[0].aval.dtype), identity(len(out_shape)),
                       name=name)]
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    left = [next(letters) for _ in range(lr)]
    right = [None] * rr
    for a, b in zip(list(lc) + list(lb), list(rc) + list(rb)):
        right[b] = left[a]
    right = [r if r is not None else next(letters) for r in right]
    free_l = [left[i] for i in range(lr) if i not in lc and i not in lb]
    free_r = [right[i] for i in range(rr) if i not in rc and i not in rb]
    out = [left[i] for i in lb] + free_l + free_r
    equation = f"{''.join(left)},{''.join(right)}->{''.join(out)}"
    name = t.node("Einsum", [t.tensor(lhs, identity(lr)), t.tensor(rhs, identity(rr))],
                  equation=equation)[0]
    return [Value(out_shape, np.dtype(eqn.outvars[0].aval.dtype), identity(len(out_shape)),
                   name=name)]


def op_conv_general_dilated(t, eqn, ins):
    p = eqn.params
    if any(d != 1 for d in p["lhs_dilation"]):
        raise UnsupportedExportError("transposed convolution (lhs_dilation != 1)")
    if p["batch_group_count"] != 1:
        raise UnsupportedExportError("convolution with batch_group_count != 1")
    pads = [tuple(int(x) for x in pair) for pair in p["padding"]]
    if any(x < 0 for pair in pads for x in pair):
        raise UnsupportedExportError("convolution with negative padding")
    dn = p["dimension_numbers"]
    lhs = t.full(ins[0], tuple(eqn.invars[0].aval.shape))
    rhs = t.full(ins[1], tuple(eqn.invars[1].aval.shape))
    name = t.node("Conv", [t.tensor(lhs, tuple(dn.lhs_spec)), t.tensor(rhs, tuple(dn.rhs_spec))],
                  strides=[int(s) for s in p["window_strides"]],
                  pads=[lo for lo, _ in pads] + [hi for _, hi in pads],
                  dilations=[int(d) for d in p["rhs_dilation"]],
                  group=int(p["feature_group_count"]))[0]
    return [Value(tuple(eqn.outvars[0].aval.shape), lhs.dtype, tuple(dn.out_spec), name=name)]


def op_concatenate(t, eqn, ins):
    dim = eqn.params["dimension"]
    vals = [t.full(v, tuple(var.aval.shape)) for v, var in zip(ins, eqn.invars)]
    perm = _layout(vals, len(vals[0].shape))
    name = t.node("Concat", [t.tensor(v, perm) for v in vals], axis=perm.index(dim))[0]
    return [Value(tuple(eqn.outvars[0].aval.shape), vals[0].dtype, perm, name=name)]


def op_pad(t, eqn, ins):
    v = t.full(ins[0], tuple(eqn.invars[0].aval.shape))
    config = eqn.params["padding_config"]
    if any(interior != 0 or lo < 0 or hi < 0 for lo, hi, interior in config):
        raise UnsupportedExportError("pad with interior or negative padding")
    pads = [config[a][0] for a in v.perm] + [config[a][1] for a in v.perm]
    value = ins[1]
    if value.const is None:
        raise UnsupportedExportError("pad with a computed padding value")
    name = t.node("Pad", [v.name, t.initializer(np.asarray(pads, np.int64), "pads"),
                          t.initializer(np.asarray(value.const, v.dtype))])[0]
    return [Value(tuple(eqn.outvars[0].aval.shape), v.dtype, v.perm, name=name)]


def op_slice(t, eqn, ins):
    v = t.full(ins[0], tuple(eqn.invars[0].aval.shape))
    p = eqn.params
    strides = p["strides"] or (1,) * len(v.shape)
    def vec(values):
        out = []
        for a in v.perm:
            if isinstance(values[a], (int, np.integer)):
                out.append(int(values[a]))
            elif values is p["limit_indices"] and same_dim(values[a], v.shape[a]):
                out.append(np.iinfo(np.int64).max)  # up to the (dynamic) end
            else:
                raise UnsupportedExportError(f"slice bound {values[a]} on a dynamic axis")
        return t.initializer(np.asarray(out, np.int64), "slice")

    name = t.node("Slice", [v.name, vec(p["start_indices"]), vec(p["limit_indices"]),
                            t.initializer(np.arange(len(v.shape), dtype=np.int64), "axes"),
                            vec(strides)])[0]
    return [Value(tuple(eqn.outvars[0].aval.shape), v.dtype, v.perm, name=name)]


def op_split(t, eqn, ins):
    v = t.full(ins[0], tuple(eqn.invars[0].aval.shape))
    axis = eqn.params["axis"]
    sizes = t.initializer(np.asarray(eqn.params["sizes"], np.int64), "split")
    names = t.node("Split", [v.name, sizes], n_out=len(eqn.outvars), axis=v.perm.index(axis))
    return [Value(tuple(var.aval.shape), v.dtype, v.perm, name=n)
            for var, n in zip(eqn.outvars, names)]


Translation = Callable[[GraphBuilder, object, list[Value]], list[Value]]

OPS: dict[str, Translation] = {
    **{name: _binary(op) for name, op in _BINARY.items()},
    **{name: _unary(op) for name, op in _UNARY.items()},
    **{name: _passthrough for name in _PASS},
    "ne": op_ne,
    "convert_element_type": op_convert_element_type,
    "rsqrt": op_rsqrt,
    "square": op_square,
    "integer_pow": op_integer_pow,
    "log1p": op_log1p,
    "expm1": op_expm1,
    "select_n": op_select_n,
    "clamp": op_clamp,
    "reshape": op_reshape,
    "expand_dims": op_expand_dims,
    "squeeze": op_squeeze,
    "broadcast_in_dim": op_broadcast_in_dim,
    "transpose": op_transpose,
    "reduce_sum": op_reduce_sum,
    "reduce_max": op_reduce_max,
    "reduce_min": op_reduce_min,
    "dot_general": op_dot_general,
    "conv_general_dilated": op_conv_general_dilated,
    "concatenate": op_concatenate,
    "pad": op_pad,
    "slice": op_slice,
    "split": op_split,
}
