"""insightface IResNet ``.onnx`` files -> insightface-layout state dicts (then kdface IResNets).

The importer follows the graph's data flow from its image input instead of trusting tensor
names (exporters rename everything: ``onnx::Conv_123``), and recognizes the IResNet structure:

* stem: ``Conv -> [BatchNormalization] -> PRelu``;
* each unit: the unit's input feeds ``BatchNormalization`` (bn1) and either the ``Add`` (identity
  shortcut) or a 1x1 ``Conv [-> BatchNormalization]`` (down-sampling shortcut); the main path is
  ``bn1 -> Conv [-> BN] -> PRelu -> Conv [-> BN] -> Add``; a stage starts at each unit with a
  down-sampling shortcut;
* head: ``BatchNormalization -> Flatten|Reshape -> [Dropout] -> Gemm|MatMul[+Add] ->
  [BatchNormalization]`` -> graph output. The embedding BatchNorm (``features``) is kept by the
  TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, the default before PyTorch 2.9)
  and folded into the FC by the ``torch.export``-based exporter (the default since PyTorch 2.9,
  which also writes opset 18 with the batch fixed at the dummy input's 1); both are read.

``Identity`` and ``Dropout`` nodes are skipped. Exporters fold a BatchNorm that follows a
convolution into the convolution (``torch.onnx.export`` in eval mode does): such a ``Conv`` has a
bias ``c`` and no BN node, which is the BN ``scale=1, bias=0, mean=-c, var=1-eps`` (exactly
``x + c``); a conv bias before a kept BN moves into its mean. A BN epsilon other than kdface's
1e-5 is absorbed into the variance (``var + eps - 1e-5``), so the output is unchanged. Strides
and paddings are checked against the IResNet layout (3x3 pad 1, stride 2 at each stage's first
unit), so a graph that only resembles an IResNet is refused rather than silently misread.

``onnx`` is an optional dependency (``pip install onnx``), imported only here.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["NotIResNetGraphError", "iresnet_state_from_onnx"]

_EPS = 1e-5  # kdface's BatchNorm epsilon (kdface.models._layers.BN_EPSILON)
_SKIP = ("Identity", "Dropout")


class NotIResNetGraphError(ValueError):
    """A readable ONNX graph that is not an insightface IResNet (the general ONNX teacher,
    ``_onnx_teacher``, may still read it)."""


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError("reading .onnx files needs the optional 'onnx' package: "
                          "pip install onnx") from None
    return onnx, numpy_helper


class _Graph:
    """Constants, producers and consumers of an ONNX graph."""

    def __init__(self, graph, numpy_helper, path: str):
        self.path = path
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(attr.t)
                continue
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        for node in graph.node:  # Identity of a constant (shared weights)
            if node.op_type == "Identity" and node.input[0] in self.consts:
                self.consts[node.output[0]] = self.consts[node.input[0]]
        inputs = [i.name for i in graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            self.fail(f"expected one image input, found {inputs}")
        self.input = inputs[0]
        self.outputs = [o.name for o in graph.output]

    def fail(self, message: str):
        raise NotIResNetGraphError(f"{self.path}: not an insightface IResNet graph: {message}")

    def next_nodes(self, tensor: str) -> list:
        """Consumers of ``tensor``, looking through Identity / Dropout, ignoring Shape."""
        out = []
        for node in self.consumers.get(tensor, []):
            if node.op_type in _SKIP:
                out += self.next_nodes(node.output[0])
            elif node.op_type == "Shape":
                continue  # reads only the shape (e.g. an exporter's dynamic Reshape)
            else:
                out.append(node)
        return out

    def single_next(self, tensor: str, op: str | tuple[str, ...], what: str):
        nodes = self.next_nodes(tensor)
        ops = (op,) if isinstance(op, str) else op
        if len(nodes) != 1 or nodes[0].op_type not in ops:
            found = [n.op_type for n in nodes] or "nothing"
            self.fail(f"expected {what} ({'/'.join(ops)}), found {found}")
        return nodes[0]

    def const(self, node, index: int, what: str) -> np.ndarray:
        if index >= len(node.input) or node.input[index] not in self.consts:
            self.fail(f"{node.op_type} {node.name!r}: {what} is not a constant")
        return np.asarray(self.consts[node.input[index]], np.float32)


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            if a.type == a.INT:
                return a.i
            if a.type == a.FLOAT:
                return a.f
            if a.type == a.INTS:
                return list(a.ints)
    return default


def _bn_params(g: _Graph, node) -> dict[str, np.ndarray]:
    eps = float(_attr(node, "epsilon", 1e-5))
    return {"weight": g.const(node, 1, "scale"), "bias": g.const(node, 2, "bias"),
            "running_mean": g.const(node, 3, "mean"),
            "running_var": g.const(node, 4, "variance") + np.float32(eps - _EPS)}


def _conv_bn(g: _Graph, node, *, stride: int, what: str):
    """A ``Conv [-> BatchNormalization]`` pair: ``(weight, bn params, output tensor)``."""
    weight = g.const(node, 1, "weight")
    k = weight.shape[-1]
    if (_attr(node, "group", 1) != 1 or _attr(node, "strides", [1, 1]) != [stride, stride]
            or _attr(node, "pads", [0, 0, 0, 0]) != [k // 2] * 4
            or _attr(node, "dilations", [1, 1]) != [1, 1] or weight.shape[-2] != k):
        g.fail(f"{what} conv {node.name!r} is not a {k}x{k} conv with stride {stride} and "
               f"padding {k // 2}")
    bias = g.const(node, 2, "bias") if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    nxt = g.next_nodes(out)
    if len(nxt) == 1 and nxt[0].op_type == "BatchNormalization":
        bn = _bn_params(g, nxt[0])
        out = nxt[0].output[0]
    else:
        ones = np.ones(weight.shape[0], np.float32)
        bn = {"weight": ones, "bias": np.zeros_like(ones), "running_mean": np.zeros_like(ones),
              "running_var": ones - np.float32(_EPS)}
    if bias is not None:
        bn["running_mean"] = bn["running_mean"] - bias
    return weight, bn, out


def _prelu(g: _Graph, node, channels: int) -> np.ndarray:
    slope = g.const(node, 1, "slope").reshape(-1)
    if slope.size == 1:
        slope = np.full(channels, slope[0], np.float32)
    return slope


def _put(state: dict, prefix: str, weight=None, bn=None) -> None:
    if weight is not None:
        state[f"{prefix}.weight"] = weight
    for k, v in (bn or {}).items():
        state[f"{prefix}.{k}"] = v


def _unit(g: _Graph, x: str, state: dict, prefix: str, downsample: bool) -> str:
    """Reads one residual unit starting at its input tensor ``x``; returns its output."""
    nodes = g.next_nodes(x)
    bn1 = next((n for n in nodes if n.op_type == "BatchNormalization"), None)
    if bn1 is None:
        g.fail(f"unit {prefix} does not start with a BatchNormalization")
    stride = 2 if downsample else 1
    _put(state, f"{prefix}.bn1", bn=_bn_params(g, bn1))
    conv1 = g.single_next(bn1.output[0], "Conv", f"{prefix}.conv1")
    w, bn, h = _conv_bn(g, conv1, stride=1, what=f"{prefix}.conv1")
    _put(state, f"{prefix}.conv1", weight=w)
    _put(state, f"{prefix}.bn2", bn=bn)
    prelu = g.single_next(h, "PRelu", f"{prefix}.prelu")
    state[f"{prefix}.prelu.weight"] = _prelu(g, prelu, w.shape[0])
    conv2 = g.single_next(prelu.output[0], "Conv", f"{prefix}.conv2")
    w, bn, main = _conv_bn(g, conv2, stride=stride, what=f"{prefix}.conv2")
    _put(state, f"{prefix}.conv2", weight=w)
    _put(state, f"{prefix}.bn3", bn=bn)
    add = g.single_next(main, "Add", f"{prefix} residual addition")
    shortcut = [i for i in add.input if i != main]
    if len(shortcut) != 1:
        g.fail(f"unit {prefix}: the addition does not take a shortcut")
    if downsample:
        conv = next((n for n in nodes if n.op_type == "Conv"), None)
        if conv is None:
            g.fail(f"unit {prefix}: no down-sampling convolution")
        w, bn, short = _conv_bn(g, conv, stride=2, what=f"{prefix}.downsample")
        _put(state, f"{prefix}.downsample.0", weight=w)
        _put(state, f"{prefix}.downsample.1", bn=bn)
        if short != shortcut[0]:
            g.fail(f"unit {prefix}: the down-sampling branch does not reach the addition")
    elif shortcut[0] != x and not _same_through_skips(g, x, shortcut[0]):
        g.fail(f"unit {prefix}: the identity shortcut does not come from the unit's input")
    return add.output[0]


def _same_through_skips(g: _Graph, x: str, y: str) -> bool:
    for node in g.consumers.get(x, []):
        if node.op_type in _SKIP and (node.output[0] == y or
                                      _same_through_skips(g, node.output[0], y)):
            return True
    return False


def _head(g: _Graph, x: str, state: dict) -> None:
    bn = g.single_next(x, "BatchNormalization", "the final BatchNorm (bn2)")
    _put(state, "bn2", bn=_bn_params(g, bn))
    flat = g.single_next(bn.output[0], ("Flatten", "Reshape"), "the flatten before the FC")
    if flat.op_type == "Flatten" and _attr(flat, "axis", 1) != 1:
        g.fail("the Flatten before the FC is not over axes 1..3")
    fc = g.single_next(flat.output[0], ("Gemm", "MatMul"), "the FC")
    if fc.op_type == "Gemm":
        weight = g.const(fc, 1, "weight")
        if _attr(fc, "transA", 0):
            g.fail("the FC Gemm transposes its input")
        if not _attr(fc, "transB", 0):
            weight = weight.T
        alpha, beta = float(_attr(fc, "alpha", 1.0)), float(_attr(fc, "beta", 1.0))
        bias = (g.const(fc, 2, "bias") * beta if len(fc.input) > 2 and fc.input[2]
                else np.zeros(weight.shape[0], np.float32))
        weight, out = weight * alpha, fc.output[0]
    else:
        weight = g.const(fc, 1, "weight").T
        add = g.single_next(fc.output[0], "Add", "the FC bias")
        bias_name = next(i for i in add.input if i != fc.output[0])
        if bias_name not in g.consts:
            g.fail("the FC bias is not a constant")
        bias, out = np.asarray(g.consts[bias_name], np.float32).reshape(-1), add.output[0]
    state["fc.weight"], state["fc.bias"] = weight, bias.reshape(-1)
    after_fc = g.next_nodes(out)
    if not after_fc and _is_output(g, out):
        # The FC is the output: the exporter folded the embedding BatchNorm into it (PyTorch >=
        # 2.9's default exporter does), so the BN left is the identity (as in _conv_bn).
        ones = np.ones(weight.shape[0], np.float32)
        _put(state, "features", bn={"weight": ones, "bias": np.zeros_like(ones),
                                    "running_mean": np.zeros_like(ones),
                                    "running_var": ones - np.float32(_EPS)})
        return
    features = g.single_next(out, "BatchNormalization",
                             "the embedding BatchNorm (features) or the graph output after the FC")
    _put(state, "features", bn=_bn_params(g, features))
    if not _is_output(g, features.output[0]):
        g.fail("the embedding BatchNorm is not the graph output")


def _is_output(g: _Graph, tensor: str) -> bool:
    """Whether ``tensor`` is a graph output, directly or through Identity / Dropout."""
    return tensor in g.outputs or any(
        n.op_type in _SKIP and _is_output(g, n.output[0]) for n in g.consumers.get(tensor, []))


def iresnet_state_from_onnx(path) -> dict[str, np.ndarray]:
    """Reads an IResNet ``.onnx`` file as an insightface-layout state dict ``{key: array}``.

    The graph's input is ``[N, 3, H, W]`` (NCHW, as insightface exports); keys are those of
    ``arcface_torch/backbones/iresnet.py`` (``conv1.weight``, ``layer1.0.bn1.weight``, ...,
    ``features.running_var``), so :func:`iresnet_from_state_dict` loads the result. Raises
    ValueError naming the first node that does not fit the IResNet structure (module docstring).
    """
    onnx, numpy_helper = _onnx()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file {path} not found")
    try:
        model = onnx.load(path)
    except Exception as err:  # noqa: BLE001 - protobuf raises several kinds
        raise ValueError(f"{path} is not a readable ONNX model: {err}") from err
    g = _Graph(model.graph, numpy_helper, path)
    state: dict[str, np.ndarray] = {}
    first = [n.op_type for n in g.next_nodes(g.input)]
    if first and first[0] in ("Sub", "Mul", "Div", "Add", "Transpose"):
        g.fail(f"the input goes through {first[0]} before the stem convolution; graphs with "
               f"built-in preprocessing are not read (kdface feeds NCHW-ordered, normalized "
               f"(x / 255 - 0.5) / 0.5 RGB images itself)")
    stem = g.single_next(g.input, "Conv", "the stem convolution right after the input")
    w, bn, h = _conv_bn(g, stem, stride=1, what="stem")
    state["conv1.weight"] = w
    _put(state, "bn1", bn=bn)
    prelu = g.single_next(h, "PRelu", "the stem PReLU")
    state["prelu.weight"] = _prelu(g, prelu, w.shape[0])
    x, layer, index = prelu.output[0], 0, 0
    while True:
        ops = sorted(n.op_type for n in g.next_nodes(x))
        if ops == ["BatchNormalization"]:
            break  # the head
        if ops not in (["Add", "BatchNormalization"], ["BatchNormalization", "Conv"]):
            g.fail(f"after unit {index} of layer{layer} found consumers {ops}")
        downsample = "Conv" in ops
        if downsample:
            layer, index = layer + 1, 0
        elif layer == 0:
            g.fail("the first unit has no down-sampling shortcut")
        x = _unit(g, x, state, f"layer{layer}.{index}", downsample)
        index += 1
    if layer != 4:
        g.fail(f"found {layer} stages, IResNets have 4")
    _head(g, x, state)
    return state
