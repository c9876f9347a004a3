"""kdface backbones -> ONNX, by translating the network's jaxpr (every backbone at once).

Why a jaxpr translator: every kdface network, present or future, lowers to a few dozen JAX
primitives (``conv_general_dilated``, ``dot_general``, elementwise arithmetic, ``select_n``,
``reduce_sum``, ``reshape``, ``broadcast_in_dim`` ...), so translating primitives covers all
backbones without a per-family exporter and without a new dependency (only ``onnx``, optional).
A primitive outside the table (``_onnx_ops.OPS``) raises a clear error naming it.

Why not a library: jax2onnx 0.17 pins orbax-checkpoint < 0.11.37, incompatible with the
orbax-checkpoint kdface uses; and kdface's own pass (``_onnx_optimize``) fuses PReLU and folds
BatchNorm into the convolutions, which a generic exporter leaves to the runtime.

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

import os
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdface.interop._onnx_graph import (GraphBuilder, UnsupportedExportError, Value,
                                        const_value, identity, is_static)
from kdface.interop._onnx_ops import OPS
from kdface.interop._onnx_optimize import optimize as optimize_graph

OPSET = 17
# Call-like primitives (pjit, custom_jvp_call, remat ...) carry their body under one of these.
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _literal(var, aval) -> Value:
    value = np.asarray(var.val, dtype=aval.dtype)
    return Value(tuple(value.shape), value.dtype, identity(value.ndim), const=value)


def translate(t: GraphBuilder, jaxpr, consts, args: list[Value]) -> list[Value]:
    """Translates ``jaxpr`` (open) with constvars bound to ``consts`` and invars to ``args``."""
    env: dict[Any, Value] = {}
    for var, c in zip(jaxpr.constvars, consts):
        env[var] = c if isinstance(c, Value) else const_value(c)
    for var, a in zip(jaxpr.invars, args):
        env[var] = a

    def read(var) -> Value:
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


def _fold(eqn, ins: list[Value]) -> list[Value] | None:
    """Evaluates an equation on constant inputs at export time (None if it cannot)."""
    if any(v.const is None for v in ins) or eqn.primitive.name == "broadcast_in_dim":
        return None
    if any(not is_static(d) for var in eqn.outvars for d in var.aval.shape):
        return None
    # Pending broadcasts (size-1 axes) are carried out first: primitives want exact shapes.
    args = [jnp.asarray(np.broadcast_to(v.const, tuple(int(d) for d in var.aval.shape)))
            if all(is_static(d) for d in var.aval.shape) else jnp.asarray(v.const)
            for v, var in zip(ins, eqn.invars)]
    out = eqn.primitive.bind(*args, **eqn.params)
    out = out if eqn.primitive.multiple_results else [out]
    return [const_value(np.asarray(o)) for o in out]


def _translate_eqn(t: GraphBuilder, eqn, ins: list[Value]) -> list[Value]:
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
    if name not in OPS:
        raise UnsupportedExportError(
            f"JAX primitive {name!r} has no ONNX translation (kdface.interop._onnx_ops.OPS); "
            f"the network cannot be exported yet")
    return OPS[name](t, eqn, ins)


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
    t = GraphBuilder(onnx, symbol, input_name)
    perm = (0, 3, 1, 2) if input_layout == "nchw" else (0, 1, 2, 3)
    args = [const_value(np.asarray(leaf)) for leaf in leaves]
    args.append(Value((batch, h, w, 3), np.dtype(np.float32), perm, name=input_name))
    (out,) = translate(t, closed.jaxpr, closed.consts, args)
    out_aval = closed.jaxpr.outvars[0].aval
    if len(out_aval.shape) != 2:
        raise ValueError(f"the network returns shape {out_aval.shape}, expected [batch, E]")
    out = t.full(out, tuple(out_aval.shape))
    final = t.tensor(out, (0, 1))
    t.nodes.append(t.helper.make_node("Identity", [final], [output_name], name=output_name))
    nodes, inits = t.nodes, t.initializers
    if optimize:
        nodes, inits = optimize_graph(nodes, inits, [output_name], t.fresh)
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
    onnx = _onnx()
    model = backbone_to_onnx(backbone, **kwargs)
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    onnx.save(model, os.fspath(path))
    return model
