"""kdface backbones -> ONNX, by translating the network's jaxpr (every backbone at once).

Why a jaxpr translator: every kdface network, present or future, lowers to a few dozen JAX
primitives (``conv_general_dilated``, ``dot_general``, elementwise arithmetic, ``select_n``,
``reduce_sum``, ``reshape``, ``broadcast_in_dim`` ...), so translating primitives covers all
backbones without a per-family exporter and without a new dependency (only ``onnx``, optional).
A primitive outside the table raises a clear error naming it.

How it stays fast and exact:

* The forward pass is traced in eval mode (BatchNorm running statistics, no dropout) with a
  symbolic batch size (``jax.export.symbolic_shape``), so the ONNX batch dimension is dynamic;
  shapes that mention the batch are computed in the graph from the input's shape.
* The weights are constants of the jaxpr; every equation whose inputs are all constants is
  evaluated at export time (BatchNorm's ``rsqrt(var + eps) * scale`` becomes one vector).
* Layout: ONNX convolutions are NCHW, kdface is NHWC. Each value carries the permutation of its
  physical (ONNX) axes relative to its logical (JAX) axes; convolutions produce NCHW values,
  elementwise ops keep their operand's layout, reductions/slices map their axes, and a
  ``Transpose`` is emitted only where an op needs a layout a value does not have (in practice
  once, before the flatten that feeds the FC, which keeps PyTorch-vs-Flax flatten order right).
* Broadcasts of size-1 axes are left to ONNX's numpy-style broadcasting and materialized with
  ``Expand`` only when a non-elementwise op needs the full shape.

A peephole pass (``_onnx_optimize``) then folds the per-channel affine ops that follow a Conv or
MatMul (the BatchNorms) into its weights and rewrites ``Where(x >= 0, x, a * x)`` to ``PRelu``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

OPSET = 17
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
           "pow": "Pow", "ge": "GreaterOrEqual", "gt": "Greater", "le": "LessOrEqual",
           "lt": "Less", "eq": "Equal", "and": "And", "or": "Or", "rem": "Mod"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid",
          "sqrt": "Sqrt", "abs": "Abs", "sign": "Sign", "erf": "Erf", "floor": "Floor",
          "ceil": "Ceil", "not": "Not", "sin": "Sin", "cos": "Cos"}
_PASS = ("copy", "copy_p", "optimization_barrier", "stop_gradient", "reduce_precision")
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class UnsupportedExportError(NotImplementedError):
    """The network uses a JAX primitive (or shape) the ONNX translator does not handle."""


@dataclasses.dataclass
class _Value:
    """A translated value. ``shape`` is the logical (JAX) shape as the tensor holds it: 1 on
    axes whose broadcast is still pending. ``perm[i]`` is the logical axis stored on physical
    axis ``i``. Constants are NumPy arrays in logical layout."""
    shape: tuple
    dtype: np.dtype
    perm: tuple[int, ...]
    name: str | None = None
    const: np.ndarray | None = None


def _is_static(d) -> bool:
    return isinstance(d, (int, np.integer))


def _same_dim(a, b) -> bool:
    if _is_static(a) and _is_static(b):
        return int(a) == int(b)
    return not _is_static(a) and not _is_static(b) and str(a) == str(b)


def _broadcast_shape(shapes: list[tuple]) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[i] for s in shapes if len(s) == rank and not (_is_static(s[i]) and s[i] == 1)]
        out.append(dims[0] if dims else 1)
    return tuple(out)


def _inverse_gather(src: tuple[int, ...], dst: tuple[int, ...]) -> list[int]:
    """ONNX Transpose perm taking physical order ``src`` to ``dst`` (both logical-axis lists)."""
    return [src.index(a) for a in dst]


class _Translator:
    def __init__(self, onnx_module, batch_symbol: str):
        self.onnx = onnx_module
        self.helper = onnx_module.helper
        self.nodes: list = []
        self.initializers: dict[str, np.ndarray] = {}
        self.batch_symbol = batch_symbol
        self.input_name: str | None = None
        self._batch_tensor: str | None = None
        self._count = 0
        self._const_cache: dict[tuple, str] = {}
        self._transposed: dict[tuple, str] = {}

    # --- emission helpers ----------------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs

    def initializer(self, array: np.ndarray, hint: str = "const") -> str:
        array = np.ascontiguousarray(array)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self._const_cache:
            return self._const_cache[key]
        name = self.fresh(hint)
        self.initializers[name] = array
        if key is not None:
            self._const_cache[key] = name
        return name

    def batch_tensor(self) -> str:
        if self._batch_tensor is None:
            self._batch_tensor = self.node("Shape", [self.input_name], start=0, end=1)[0]
        return self._batch_tensor

    def shape_vector(self, dims) -> str:
        """An int64 [rank] tensor holding ``dims`` (the batch symbol read from the input)."""
        for d in dims:
            if not _is_static(d) and str(d) != self.batch_symbol:
                raise UnsupportedExportError(f"shape expression {d} (only the batch dimension "
                                             f"may be dynamic)")
        if all(_is_static(d) for d in dims):
            return self.initializer(np.asarray([int(d) for d in dims], np.int64), "shape")
        pieces = [self.batch_tensor() if not _is_static(d)
                  else self.initializer(np.asarray([int(d)], np.int64), "dim") for d in dims]
        return self.node("Concat", pieces, axis=0)[0]

    def tensor(self, v: _Value, perm: tuple[int, ...] | None = None) -> str:
        """The ONNX name of ``v`` in physical order ``perm`` (default: its own)."""
        perm = v.perm if perm is None else tuple(perm)
        if v.const is not None:
            return self.initializer(np.transpose(v.const, perm) if len(perm) > 1 else v.const)
        if perm == v.perm:
            return v.name
        key = (v.name, v.perm, perm)
        if key not in self._transposed:
            self._transposed[key] = self.node("Transpose", [v.name],
                                              perm=_inverse_gather(v.perm, perm))[0]
        return self._transposed[key]

    def full(self, v: _Value, shape: tuple) -> _Value:
        """``v`` with every pending broadcast carried out (an ``Expand``)."""
        if len(v.shape) == len(shape) and all(map(_same_dim, v.shape, shape)):
            return v
        if v.const is not None and all(_is_static(d) for d in shape):
            return _Value(tuple(shape), v.dtype, v.perm,
                          const=np.broadcast_to(v.const, [int(d) for d in shape]).copy())
        if len(v.shape) != len(shape):
            raise UnsupportedExportError(f"cannot expand {v.shape} to {shape}")
        phys = [shape[a] for a in v.perm]
        name = self.node("Expand", [self.tensor(v), self.shape_vector(phys)])[0]
        return _Value(tuple(shape), v.dtype, v.perm, name=name)


def _identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def _preferred_perm(rank: int) -> tuple[int, ...]:
    """NCHW-like order for rank-4 values (what ONNX convolutions consume)."""
    return (0, 3, 1, 2) if rank == 4 else _identity(rank)


def _literal(var, aval) -> _Value:
    value = np.asarray(var.val, dtype=aval.dtype)
    return _Value(tuple(value.shape), value.dtype, _identity(value.ndim), const=value)


def _const_value(array) -> _Value:
    array = np.asarray(array)
    return _Value(tuple(array.shape), array.dtype, _identity(array.ndim), const=array)


def translate(t: _Translator, jaxpr, consts, args: list[_Value]) -> list[_Value]:
    """Translates ``jaxpr`` (open) with constvars bound to ``consts`` and invars to ``args``."""
    env: dict[Any, _Value] = {}
    for var, c in zip(jaxpr.constvars, consts):
        env[var] = c if isinstance(c, _Value) else _const_value(c)
    for var, a in zip(jaxpr.invars, args):
        env[var] = a

    def read(var) -> _Value:
        if isinstance(var, jcore.Literal):
            return _literal(var, var.aval)
        return env[var]

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = _translate_eqn(t, eqn, ins)
        for var, val in zip(eqn.outvars, outs):
            if not isinstance(var, jcore.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _fold(eqn, ins: list[_Value]) -> list[_Value] | None:
    """Evaluates an equation on constant inputs at export time (None if it cannot)."""
    if any(v.const is None for v in ins) or eqn.primitive.name == "broadcast_in_dim":
        return None
    if any(not _is_static(d) for var in eqn.outvars for d in var.aval.shape):
        return None
    # Pending broadcasts (size-1 axes) are carried out first: primitives want exact shapes.
    args = [jnp.asarray(np.broadcast_to(v.const, tuple(int(d) for d in var.aval.shape)))
            if all(_is_static(d) for d in var.aval.shape) else jnp.asarray(v.const)
            for v, var in zip(ins, eqn.invars)]
    out = eqn.primitive.bind(*args, **eqn.params)
    out = out if eqn.primitive.multiple_results else [out]
    return [_const_value(np.asarray(o)) for o in out]


def _translate_eqn(t: _Translator, eqn, ins: list[_Value]) -> list[_Value]:
    from kdface.interop import _onnx_ops as ops
    name = eqn.primitive.name
    for key in _CALL_PARAMS:
        inner = eqn.params.get(key)
        if isinstance(inner, jcore.ClosedJaxpr):
            return translate(t, inner.jaxpr, inner.consts, ins)
        if isinstance(inner, jcore.Jaxpr):
            return translate(t, inner, [], ins)
    folded = _fold(eqn, ins)
    if folded is not None:
        return folded
    out_aval = eqn.outvars[0].aval
    if name in _PASS:
        return ins[:len(eqn.outvars)]
    if name in _BINARY or name == "ne":
        return [ops.elementwise(t, name, ins, out_aval)]
    if name in _UNARY or name in ("rsqrt", "integer_pow", "square", "log1p", "expm1",
                                  "convert_element_type"):
        return [ops.unary(t, name, ins[0], out_aval, eqn.params)]
    handler = getattr(ops, f"op_{name}", None)
    if handler is None:
        raise UnsupportedExportError(
            f"JAX primitive {name!r} has no ONNX translation (kdface.interop._onnx_ops); the "
            f"network cannot be exported yet")
    return handler(t, eqn, ins)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the optional 'onnx' package: pip install onnx"
                          ) from None
    return onnx


def backbone_to_onnx(backbone, *, input_size: tuple[int, int] | None = None,
                     input_layout: str = "nchw", optimize: bool = True,
                     input_name: str = "input", output_name: str = "embedding"):
    """The eval-mode embedding network of a kdface backbone as an ``onnx.ModelProto``.

    backbone: any ``kdface.models`` backbone (or an nnx module mapping ``[B, H, W, 3]`` images to
    ``[B, E]``); it is not modified (a copy is put in eval mode). input_size: ``(H, W)``; default
    the backbone's ``input_size``. input_layout: ``'nchw'`` (default, the insightface / ONNX
    convention: input ``[batch, 3, H, W]``) or ``'nhwc'`` (``[batch, H, W, 3]``). The input is the
    normalized RGB image ``(x / 255 - 0.5) / 0.5`` as in training; the output is the embedding
    ``[batch, E]`` (not L2-normalized). The batch dimension is dynamic. optimize: apply the
    peephole rewrites of ``_onnx_optimize`` (BatchNorm folding, PReLU fusion).

    Raises UnsupportedExportError naming a primitive without a translation.
    """
    from flax import nnx
    onnx = _onnx()
    if input_layout not in ("nchw", "nhwc"):
        raise ValueError(f"input_layout must be 'nchw' or 'nhwc', got {input_layout!r}")
    if input_size is None:
        input_size = getattr(backbone, "input_size", None)
        if input_size is None:
            raise ValueError("pass input_size=(H, W): the network does not record one")
    h, w = (int(v) for v in input_size)
    graphdef, state = nnx.split(backbone)
    leaves, treedef = jax.tree.flatten(state)

    def forward(leaves, images):
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        model.eval()
        return model(images)

    symbol = "batch"
    batch = jax.export.symbolic_shape(symbol)[0]
    images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
    closed = jax.make_jaxpr(forward)(leaves, images)
    t = _Translator(onnx, symbol)
    t.input_name = input_name
    perm = (0, 3, 1, 2) if input_layout == "nchw" else (0, 1, 2, 3)
    args = [_const_value(np.asarray(leaf)) for leaf in leaves]
    args.append(_Value((batch, h, w, 3), np.dtype(np.float32), perm, name=input_name))
    (out,) = translate(t, closed.jaxpr, closed.consts, args)
    out_aval = closed.jaxpr.outvars[0].aval
    if len(out_aval.shape) != 2:
        raise ValueError(f"the network returns shape {out_aval.shape}, expected [batch, E]")
    out = t.full(out, tuple(out_aval.shape))
    final = t.tensor(out, (0, 1))
    t.nodes.append(t.helper.make_node("Identity", [final], [output_name], name=output_name))
    nodes, inits = t.nodes, t.initializers
    if optimize:
        from kdface.interop._onnx_optimize import optimize as run_optimize
        nodes, inits = run_optimize(nodes, inits, [output_name], t.fresh)
    helper = t.helper
    in_shape = [symbol, 3, h, w] if input_layout == "nchw" else [symbol, h, w, 3]
    graph = helper.make_graph(
        nodes, "kdface_embedding",
        [helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT,
                                       [symbol, int(out_aval.shape[1])])],
        initializer=[onnx.numpy_helper.from_array(np.asarray(a), name)
                     for name, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="kdface")
    model.ir_version = 8  # readable by every ONNX Runtime that knows opset 17
    onnx.checker.check_model(model)
    return model


def export_onnx(backbone, path, **kwargs):
    """Writes :func:`backbone_to_onnx` ``(backbone, **kwargs)`` to ``path``; returns the model."""
    import os
    onnx = _onnx()
    model = backbone_to_onnx(backbone, **kwargs)
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    onnx.save(model, os.fspath(path))
    return model
