"""Any face-recognition ``.onnx`` graph as a frozen kdface teacher backbone.

:func:`onnx_graph_backbone` reads the graph once and returns an :class:`OnnxGraphBackbone`: an
``nnx.Module`` taking kdface's images (``[B, H, W, 3]`` RGB, ``(x / 255 - 0.5) / 0.5``) to the
graph's output ``[B, E]``, by interpreting the graph's nodes with the JAX op table of
``_onnx_interpreter`` (so it jits, shards and runs on any JAX device like kdface's own networks).

Loading:

* the part of the graph that does not depend on the image is computed once, in NumPy: int8
  weights behind ``DequantizeLinear`` (per tensor, per axis or blocked) become float32 weights,
  their ``Reshape`` / ``Identity`` / ``Constant`` nodes disappear;
* the float weights left become the module's state (``GraphWeight``, an ``nnx.Param``: in
  ``nnx.split``, cast with the run's compute dtype); shapes, axes, pads and scalars stay NumPy
  constants of the program (shape arithmetic, ``Shape -> Gather -> Unsqueeze -> Concat ->
  Reshape``, is static under ``jit``);
* graph inputs that also have an initializer are weights (ONNX: the initializer is their value);
  inputs no node reads are ignored; exactly one input must be left: the image;
* the first graph output is the embedding (flattened after the batch axis);
* a graph written for batch 1 (a ``Reshape`` to ``[1, ...]``) runs at any batch: such a target's
  leading 1 becomes the batch when the input has more rows;
* an op outside the table (or outside the default ONNX domain) is refused at load with a
  one-line ``ValueError`` naming the op and its node.

The input contract (:class:`InputContract`): ``size`` and ``layout`` (NCHW / NHWC) come from the
graph's input shape where it is static; the channel order and pixel normalization cannot be read
from a graph, so: a graph that normalizes its input itself (its image first goes through
``Sub`` / ``Add`` / ``Mul`` / ``Div`` by constants, as OpenCV Zoo's SFace does) is fed raw pixels
(0..255, or 0..1 when its constants say so: ``_builtin_normalization``), other graphs
insightface's ``(x - 127.5) / 127.5``; the order is RGB (insightface's, kdface's). Spec options
override each (``onnx:order=bgr,mean=127.5,std=128:PATH``, see ``_teacher``). The contract is
applied inside the module, so the teacher eats the same images as the student.

Measured for OpenCV Zoo's SFace (``face_recognition_sface_2021dec_int8bq.onnx``, ONNX Runtime on
the aligned photographs of tests/test_real_faces.py): the graph computes ``(p - 127.5) *
0.0078125`` inside and expects **RGB pixels 0..255**. Fed RGB, the lowest genuine cosine (three
photos of one person) exceeds the highest impostor cosine (three other people) by 0.437; fed BGR
by 0.408 (genuine scores drop from 0.73-0.80 to 0.62-0.71); fed kdface's [-1, 1] values every
score is near 1 and the gap is -0.071. kdface's default contract for it (raw pixels read from
the graph, RGB by default) is the measured one.

Why an interpreter of kdface's own rather than ``jaxonnxruntime`` (Google, Apache-2.0, pure
Python on PyPI): its last release, 0.3.0 (August 2023), has no ``DequantizeLinear`` /
``QuantizeLinear`` (it refuses SFace with "DequantizeLinear is not implemented"), pins ``onnx
1.12`` in its ``all`` extra, and would still need the initializer-shadowing inputs, the folding
of quantized weights into state and the input contract done here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdface.interop._onnx_interpreter import OPS, STATIC_INPUTS

__all__ = ["GraphWeight", "InputContract", "OnnxGraphBackbone", "onnx_graph_backbone",
           "SUPPORTED_ONNX_OPS"]

SUPPORTED_ONNX_OPS = tuple(sorted(OPS))
_PREPROCESS = ("Sub", "Add", "Mul", "Div")
_INSIGHTFACE = (127.5, 127.5)  # (x - 127.5) / 127.5 == (x / 255 - 0.5) / 0.5


class GraphWeight(nnx.Param):
    """A weight of an imported ONNX graph (frozen: the teacher is never trained)."""


@dataclasses.dataclass(frozen=True)
class InputContract:
    """What the graph's input expects: ``size`` ``(H, W)``; ``layout`` ``'nchw'`` or ``'nhwc'``;
    ``order`` ``'rgb'`` or ``'bgr'``; pixels ``p`` in 0..255 are fed as ``(p - mean) / std``
    (per channel, in the graph's channel order). ``origin`` says for each field whether it was
    read from the graph, given as an option, or is the default."""
    size: tuple[int, int]
    layout: str
    order: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    origin: tuple[tuple[str, str], ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"size": list(self.size), "layout": self.layout, "order": self.order,
                "mean": list(self.mean), "std": list(self.std), "origin": dict(self.origin)}


@dataclasses.dataclass(frozen=True)
class _Node:
    op: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...]


class _Program:
    """The image-dependent nodes of a graph with their NumPy constants; equal (and hashed) by
    the file's content and contract, so that jit caches are shared between loads of one file."""

    def __init__(self, nodes, statics, weight_names, image, output, batch, digest, source):
        self.nodes, self.statics, self.weight_names = nodes, statics, weight_names
        self.image, self.output, self.batch = image, output, batch
        self.digest, self.source = digest, source

    def __hash__(self):
        return hash(self.digest)

    def __eq__(self, other):
        return isinstance(other, _Program) and other.digest == self.digest

    def run(self, weights, x):
        env: dict[str, Any] = dict(self.statics)
        env.update(zip(self.weight_names, weights))
        env[self.image] = x
        rows = x.shape[0]
        for node in self.nodes:
            static = STATIC_INPUTS.get(node.op, ())
            ins = [None if not name else
                   (self.statics.get(name, env.get(name)) if i in static else env[name])
                   for i, name in enumerate(node.inputs)]
            attrs = dict(node.attrs)
            if (node.op == "Reshape" and self.batch is not None and rows != self.batch
                    and not isinstance(ins[0], np.ndarray)):
                ins[1] = _batch_reshape(ins[0], ins[1], self.batch, rows)
            try:
                outs = OPS[node.op](ins, attrs)
            except Exception as err:  # noqa: BLE001 - shape/type errors of many kinds
                raise ValueError(f"{self.source}: ONNX node {node.name!r} ({node.op}) failed: "
                                 f"{err}") from err
            env.update(zip(node.outputs, outs))
        return env[self.output]


def _batch_reshape(x, target, batch: int, rows: int):
    """A Reshape target written for the graph's fixed batch, for ``rows`` rows: its leading
    ``batch`` becomes ``rows`` when the target does not fit the tensor as written."""
    t = np.asarray(target).reshape(-1).copy()
    size = int(np.prod(np.shape(x)))
    known = [int(d) for d in t if d not in (-1, 0)]
    if len(t) and int(t[0]) == batch and -1 not in t and int(np.prod(known)) != size:
        t[0] = rows
    elif len(t) and int(t[0]) == batch and -1 in t[1:] and np.shape(x)[0] == rows:
        t[0] = rows
    return t


class OnnxGraphBackbone(nnx.Module):
    """A frozen ONNX graph as a kdface backbone: ``[B, H, W, 3]`` kdface-normalized RGB images
    -> ``[B, E]`` (the graph's output, flattened after the batch axis). The graph's input
    contract (``contract``) is applied inside. It has no stage features: ``stage_shapes`` and
    ``forward_from`` raise (recipes on teacher stages need a kdface or IResNet teacher)."""

    def __init__(self, program: _Program, weights: list[np.ndarray], contract: InputContract,
                 embedding_size: int, name: str):
        self.program = program
        self.weights = nnx.List([GraphWeight(jnp.asarray(w)) for w in weights])
        self.contract = contract
        self.input_size = tuple(contract.size)
        self.embedding_size = int(embedding_size)
        self.graph_name = name

    def __call__(self, x: jax.Array, *, return_stages: bool = False):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3], got shape {tuple(x.shape)}")
        if tuple(x.shape[1:3]) != self.input_size:
            raise ValueError(f"{self.graph_name} takes {self.input_size} images, got "
                             f"{tuple(x.shape[1:3])}")
        c = self.contract
        if c.order == "bgr":
            x = x[..., ::-1]
        # kdface's x = p / 127.5 - 1 with pixels p: (p - mean) / std = x * a + b
        a = np.asarray([127.5 / s for s in c.std], np.float32)
        b = np.asarray([(127.5 - m) / s for m, s in zip(c.mean, c.std)], np.float32)
        x = x * a.reshape(1, 1, 1, 3).astype(x.dtype) + b.reshape(1, 1, 1, 3).astype(x.dtype)
        if c.layout == "nchw":
            x = jnp.transpose(x, (0, 3, 1, 2))
        out = self.program.run([w[...] for w in self.weights], x)
        out = out.reshape(out.shape[0], -1)
        return (out, []) if return_stages else out

    def stage_shapes(self, input_hw=None):
        raise ValueError(f"{self.graph_name}: an ONNX graph teacher has no stage features; "
                         f"recipes that read the teacher's stages need a kdface teacher run or "
                         f"an insightface IResNet")

    def forward_from(self, i: int, feature: jax.Array):
        self.stage_shapes()


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError("reading .onnx files needs the optional 'onnx' package: "
                          "pip install onnx") from None
    return onnx, numpy_helper


def _attrs(node, onnx) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, list):
            v = tuple(v)
        if isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


def _constant_value(node, attrs, numpy_helper) -> np.ndarray:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype)
    raise ValueError(f"Constant node {node.name!r} with attributes {sorted(attrs)}")


def _dims(value_info) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def onnx_graph_backbone(path, *, input_size: tuple[int, int] | None = None,
                        options: dict[str, Any] | None = None) -> OnnxGraphBackbone:
    """Reads the ONNX graph at ``path`` as an :class:`OnnxGraphBackbone` (module docstring).

    input_size: ``(H, W)`` the caller feeds; must agree with a graph of static input size, and
    sets the size of a graph whose input is dynamic (112x112 when None). options: the contract
    overrides ``order`` ('rgb'/'bgr'), ``layout`` ('nchw'/'nhwc'), ``mean`` / ``std`` (one float
    or three, on 0..255 pixels), ``size`` ``(H, W)``. Raises ValueError for an unreadable file,
    an unsupported op (naming it and its node), or an input contract that cannot be settled.
    """
    onnx, numpy_helper = _onnx()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file {path} not found")
    try:
        model = onnx.load(path)  # with any external data files beside it
    except Exception as err:  # noqa: BLE001 - protobuf raises several kinds
        raise ValueError(f"{path} is not a readable ONNX model: {err}") from err
    options = dict(options or {})
    unknown = set(options) - {"order", "layout", "mean", "std", "size"}
    if unknown:
        raise ValueError(f"unknown ONNX teacher options {sorted(unknown)}; known: order, layout, "
                         f"mean, std, size")
    graph = model.graph
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or (node.op_type not in OPS
                                                  and node.op_type != "Constant"):
            where = f" of domain {node.domain!r}" if node.domain not in ("", "ai.onnx") else ""
            raise ValueError(f"{path}: ONNX op {node.op_type}{where} (node {node.name!r}) is not "
                             f"supported by kdface's ONNX reader")

    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    images = [i for i in graph.input if i.name not in consts and i.name in used]
    if len(images) != 1:
        raise ValueError(f"{path}: expected one image input (besides initializers and unused "
                         f"inputs), found {[i.name for i in images]}")
    image = images[0]
    if not graph.output:
        raise ValueError(f"{path}: the graph has no output")
    output = graph.output[0].name

    # Fold what does not depend on the image, in graph (topological) order.
    runtime: list[_Node] = []
    for n in graph.node:
        attrs = _attrs(n, onnx)
        if n.op_type == "Constant":
            consts[n.output[0]] = _constant_value(n, attrs, numpy_helper)
            continue
        if n.op_type == "Split":
            attrs["_outputs"] = len(n.output)
        node = _Node(n.op_type, n.name or n.output[0], tuple(n.input), tuple(n.output),
                     tuple(sorted(attrs.items())))
        if all(not i or i in consts for i in n.input):
            try:
                outs = OPS[n.op_type]([consts[i] if i else None for i in n.input], attrs)
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"{path}: ONNX node {node.name!r} ({n.op_type}) on constants "
                                 f"failed: {err}") from err
            for o, v in zip(n.output, outs):
                consts[o] = np.asarray(v)
        else:
            runtime.append(node)
    if output in consts:
        raise ValueError(f"{path}: the output {output!r} does not depend on the image")

    needed, live = {output}, []
    for node in reversed(runtime):
        if any(o in needed for o in node.outputs):
            live.append(node)
            needed.update(i for i in node.inputs if i)
    live.reverse()

    static_use = {node.inputs[i] for node in live for i in STATIC_INPUTS.get(node.op, ())
                  if i < len(node.inputs)}
    statics, weight_names, weights = {}, [], []
    for name in sorted(needed & set(consts)):
        value = consts[name]
        if (name in static_use or not np.issubdtype(value.dtype, np.floating)
                or value.size <= 1):
            statics[name] = value
        if name not in static_use and np.issubdtype(value.dtype, np.floating) and value.size > 1:
            weight_names.append(name)
            weights.append(value)

    contract = _contract(path, image, live, consts, input_size, options)
    dims = _dims(image)
    batch = dims[0] if dims and dims[0] else None
    digest = hashlib.sha256(model.SerializeToString() + repr(contract).encode()).hexdigest()
    program = _Program(tuple(live), statics, tuple(weight_names), image.name, output, batch,
                       digest, path)
    name = os.path.basename(path)
    # The embedding size, and every shape checked once, on an abstract batch of 2.
    out = jax.eval_shape(lambda w, x: program.run(w, x),
                         [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
                         jax.ShapeDtypeStruct(_input_shape(contract, 2), np.float32))
    if len(out.shape) < 2 or out.shape[0] != 2:
        raise ValueError(f"{path}: the output {output!r} has shape {out.shape} for a batch of 2; "
                         f"expected [B, E]")
    backbone = OnnxGraphBackbone(program, weights, contract, int(np.prod(out.shape[1:])), name)
    backbone.eval()
    return backbone


def _input_shape(contract: InputContract, batch: int) -> tuple[int, ...]:
    h, w = contract.size
    return (batch, 3, h, w) if contract.layout == "nchw" else (batch, h, w, 3)


def _triple(value, what: str) -> tuple[float, float, float]:
    values = value if isinstance(value, (tuple, list)) else (value,)
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"{what} takes one value or three (per channel), got {value!r}")
    return values


def _contract(path, image, live, consts, input_size, options) -> InputContract:
    origin = {}
    dims = _dims(image)
    if len(dims) != 4:
        raise ValueError(f"{path}: the image input {image.name!r} has rank {len(dims)}, "
                         f"expected [N, 3, H, W] or [N, H, W, 3]")
    layout = options.get("layout")
    if layout is not None:
        if layout not in ("nchw", "nhwc"):
            raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
        origin["layout"] = "option"
    elif dims[1] == 3 and dims[3] != 3:
        layout, origin["layout"] = "nchw", "graph"
    elif dims[3] == 3 and dims[1] != 3:
        layout, origin["layout"] = "nhwc", "graph"
    else:
        raise ValueError(f"{path}: cannot tell NCHW from NHWC from the input shape {dims}; "
                         f"give the option layout=nchw or layout=nhwc")
    hw = tuple(dims[2:4]) if layout == "nchw" else tuple(dims[1:3])
    size = options.get("size")
    if size is not None:
        size, origin["size"] = tuple(int(v) for v in size), "option"
    elif all(hw):
        size, origin["size"] = tuple(int(v) for v in hw), "graph"
    else:
        size = tuple(input_size) if input_size is not None else (112, 112)
        origin["size"] = "caller" if input_size is not None else "default"
    if all(hw) and tuple(size) != tuple(int(v) for v in hw):
        raise ValueError(f"{path}: the graph takes {hw[0]}x{hw[1]} images, not "
                         f"{size[0]}x{size[1]}")
    if input_size is not None and tuple(input_size) != tuple(size):
        raise ValueError(f"{path}: the graph takes {size[0]}x{size[1]} images, the run feeds "
                         f"{input_size[0]}x{input_size[1]}; use --input_size="
                         f"{size[0]},{size[1]}")
    order = options.get("order", "rgb")
    if order not in ("rgb", "bgr"):
        raise ValueError(f"order must be 'rgb' or 'bgr', got {order!r}")
    origin["order"] = "option" if "order" in options else "default"
    builtin = _builtin_normalization(image.name, live, consts)
    if builtin is None:
        mean, std = _INSIGHTFACE
        norm = "default"
    else:  # the graph normalizes: raw pixels, 0..1 when its mean is at most 1
        mean, std = (0.0, 1.0) if builtin == 255.0 else (0.0, 255.0)
        norm = "graph"
    if "mean" in options or "std" in options:
        norm = "option"
    origin["mean"] = origin["std"] = norm
    return InputContract(size=tuple(size), layout=layout, order=order,
                         mean=_triple(options.get("mean", mean), "mean"),
                         std=_triple(options.get("std", std), "std"),
                         origin=tuple(sorted(origin.items())))


def _builtin_normalization(image: str, live, consts) -> float | None:
    """The pixel range (255.0 or 1.0) a graph that normalizes its own input expects, or None
    when the image does not first go through Sub/Add/Mul/Div by constants (Transpose, Cast,
    Identity looked through). The range is the one the graph's affine chain maps to values of
    order 1: pixels 0 and 255 pushed through it stay within +-8 for a 0..255 graph (SFace:
    ``(255 - 127.5) * 0.0078125 = 0.996``), while a 0..1 graph (``(p - 0.5) / 0.5``) sends 255 to
    509."""
    tensor, ends, seen = image, np.asarray([0.0, 255.0]), False
    for _ in range(8):
        users = [n for n in live if tensor in n.inputs]
        if len(users) != 1:
            break
        node = users[0]
        if node.op in ("Transpose", "Cast", "Identity"):
            tensor = node.outputs[0]
            continue
        other = [i for i in node.inputs if i != tensor]
        if node.op not in _PREPROCESS or len(other) != 1 or other[0] not in consts:
            break
        c = float(np.mean(consts[other[0]]))
        first = node.inputs[0] == tensor
        if node.op == "Sub":
            ends = ends - c if first else c - ends
        elif node.op == "Add":
            ends = ends + c
        elif node.op == "Mul":
            ends = ends * c
        else:
            ends = ends / c if first else c / np.where(ends == 0, 1.0, ends)
        seen, tensor = True, node.outputs[0]
    if not seen:
        return None
    return 255.0 if float(np.max(np.abs(ends))) <= 8.0 else 1.0
