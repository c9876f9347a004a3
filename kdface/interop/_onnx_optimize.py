"""Peephole rewrites of the exported ONNX graph (exact up to float rounding).

The jaxpr translation writes BatchNorm as ``(x - mean) * s + b`` and PReLU as
``Where(x >= 0, x, a * x)``. These rewrites leave fewer, cheaper nodes, so that any runtime, not
only ONNX Runtime with its own fusions, runs the network at full speed:

* ``Sub(x, k)`` with a constant ``k`` -> ``Add(x, -k)``;
* ``Mul(Add(x, a), s)`` -> ``Add(Mul(x, s), a*s)``; ``Add(Add(x, a), b)`` -> ``Add(x, a+b)``;
  ``Mul(Mul(x, s), r)`` -> ``Mul(x, s*r)`` (affine chains shrink to one Mul and one Add);
* per-output-channel ``Add`` / ``Mul`` after a ``Conv`` or ``Gemm`` -> folded into its weights
  and bias (the BatchNorm fold of eval-mode inference);
* ``Where(x >= 0, x, Mul(x, a))`` -> ``PRelu(x, a)``; ``Max(x, 0)`` -> ``Relu(x)``.

A rewrite applies only where the intermediate tensor has a single consumer and is not a graph
output. Dead nodes and unused initializers are dropped at the end.
"""
from __future__ import annotations

import numpy as np


class _Graph:
    def __init__(self, nodes, inits: dict[str, np.ndarray], outputs: list[str], fresh):
        self.nodes, self.inits, self.outputs, self.fresh = list(nodes), inits, set(outputs), fresh
        self.index()

    def index(self) -> None:
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.uses: dict[str, int] = {}
        for n in self.nodes:
            for i in n.input:
                self.uses[i] = self.uses.get(i, 0) + 1

    def const(self, name: str) -> np.ndarray | None:
        return self.inits.get(name)

    def private(self, name: str):
        """The producer of ``name`` if ``name`` feeds exactly one node and is no graph output."""
        if self.uses.get(name, 0) != 1 or name in self.outputs:
            return None
        return self.producer.get(name)

    def split_const(self, node):
        """``(tensor input, constant)`` of a binary node with exactly one constant input."""
        a, b = node.input[0], node.input[1]
        ka, kb = self.const(a), self.const(b)
        if kb is not None and ka is None:
            return a, kb, 1
        if ka is not None and kb is None:
            return b, ka, 0
        return None, None, None

    def new_const(self, array: np.ndarray) -> str:
        name = self.fresh("folded")
        self.inits[name] = np.ascontiguousarray(array)
        return name

    def remove(self, node) -> None:
        self.nodes = [n for n in self.nodes if n is not node]


def _channel_vector(k: np.ndarray, channels: int, axis: int, rank: int) -> np.ndarray | None:
    """``k`` as a ``[channels]`` vector if it broadcasts along ``axis`` of a rank-``rank``
    tensor only (or is a scalar)."""
    if k.size == 1:
        return np.full(channels, k.reshape(()), np.float32)
    if k.ndim > rank or k.size != channels:
        return None
    shape = (1,) * (rank - k.ndim) + k.shape
    if shape[axis] != channels:
        return None
    return k.reshape(channels).astype(np.float32)


def _sub_to_add(g: _Graph) -> bool:
    for n in g.nodes:
        if n.op_type == "Sub" and g.const(n.input[1]) is not None and g.const(n.input[0]) is None:
            n.op_type = "Add"
            n.input[1] = g.new_const(-g.const(n.input[1]))
            return True
    return False


def _merge_affine(g: _Graph) -> bool:
    for n in g.nodes:
        if n.op_type not in ("Add", "Mul"):
            continue
        x, k, _ = g.split_const(n)
        if x is None:
            continue
        p = g.private(x)
        if p is None or p.op_type not in ("Add", "Mul"):
            continue
        y, kp, _ = g.split_const(p)
        if y is None:
            continue
        if n.op_type == p.op_type:  # (y + a) + b, (y * s) * r
            merged = kp + k if n.op_type == "Add" else kp * k
            p.input[:] = [y, g.new_const(merged.astype(kp.dtype))]
            p.output[0] = n.output[0]
            g.remove(n)
            return True
        if n.op_type == "Mul" and p.op_type == "Add":  # (y + a) * s -> y * s + a * s
            p.op_type, n.op_type = "Mul", "Add"
            p.input[:] = [y, g.new_const(k)]
            n.input[:] = [x, g.new_const((kp * k).astype(k.dtype))]
            return True
    return False


def _fold_into_weights(g: _Graph) -> bool:
    for n in g.nodes:
        if n.op_type not in ("Add", "Mul"):
            continue
        x, k, _ = g.split_const(n)
        p = g.private(x) if x is not None else None
        if p is None or p.op_type not in ("Conv", "Gemm") or g.const(p.input[1]) is None:
            continue
        w = g.const(p.input[1])
        if p.op_type == "Conv":
            channels, axis, rank, w_axis = w.shape[0], 1, 4 if w.ndim == 4 else w.ndim, 0
        else:
            if any(a.name in ("transA", "transB") and a.i for a in p.attribute):
                continue
            channels, axis, rank, w_axis = w.shape[1], 1, 2, 1
        v = _channel_vector(k, channels, axis, rank)
        if v is None:
            continue
        bias = (g.const(p.input[2]).astype(np.float32) if len(p.input) > 2 and p.input[2]
                else np.zeros(channels, np.float32))
        if bias.shape != (channels,):
            continue
        if n.op_type == "Add":
            bias = bias + v
        else:
            shape = [1] * w.ndim
            shape[w_axis] = channels
            w = w * v.reshape(shape)
            bias = bias * v
        p.input[1] = g.new_const(w.astype(np.float32))
        if len(p.input) > 2:
            p.input[2] = g.new_const(bias)
        else:
            p.input.append(g.new_const(bias))
        p.output[0] = n.output[0]
        g.remove(n)
        return True
    return False


def _is_zero(k) -> bool:
    return k is not None and k.size >= 1 and not np.any(k)


def _fuse_activations(g: _Graph) -> bool:
    for n in g.nodes:
        if n.op_type == "Max" and len(n.input) == 2:
            x, k, _ = g.split_const(n)
            if x is not None and k.size == 1 and _is_zero(k):
                n.op_type = "Relu"
                n.input[:] = [x]
                return True
        if n.op_type != "Where":
            continue
        cond, a, b = n.input
        ge, mul = g.private(cond), g.private(b)
        if ge is None or mul is None or ge.op_type not in ("GreaterOrEqual", "Greater"):
            continue
        if ge.input[0] != a or not _is_zero(g.const(ge.input[1])) or mul.op_type != "Mul":
            continue
        x, slope, _ = g.split_const(mul)
        if x != a:
            continue
        n.op_type = "PRelu"
        n.input[:] = [a, mul.input[1] if g.const(mul.input[1]) is not None else mul.input[0]]
        g.remove(ge)
        g.remove(mul)
        return True
    return False


def _live(g: _Graph) -> list:
    needed = set(g.outputs)
    keep = []
    for n in reversed(g.nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    return keep


def optimize(nodes, inits: dict[str, np.ndarray], outputs: list[str], fresh):
    """Applies the module docstring's rewrites until none applies; returns ``(nodes, inits)``
    with only the nodes and initializers the outputs need."""
    g = _Graph(nodes, inits, outputs, fresh)
    passes = (_sub_to_add, _merge_affine, _fold_into_weights, _fuse_activations)
    while True:
        for rewrite in passes:
            if rewrite(g):
                g.index()
                break
        else:
            break
    g.nodes = _live(g)
    used = {i for n in g.nodes for i in n.input}
    return g.nodes, {k: v for k, v in g.inits.items() if k in used}
