"""The ONNX graph under construction, shared by the jaxpr translator and its op table.

``GraphBuilder`` collects nodes and initializers; ``Value`` is one translated JAX value (an ONNX
tensor name or a NumPy constant) with its layout: ONNX convolutions are NCHW while kdface is
NHWC, so each value records the permutation of its physical (ONNX) axes relative to its logical
(JAX) axes, and the size-1 axes whose broadcast is still pending.
"""
from __future__ import annotations

import dataclasses

import numpy as np


class UnsupportedExportError(NotImplementedError):
    """The network uses a JAX primitive (or shape) the ONNX translator does not handle."""


@dataclasses.dataclass
class Value:
    """A translated value. ``shape`` is the logical (JAX) shape as the tensor holds it: 1 on
    axes whose broadcast is still pending. ``perm[i]`` is the logical axis stored on physical
    axis ``i``. Constants are NumPy arrays in logical layout."""
    shape: tuple
    dtype: np.dtype
    perm: tuple[int, ...]
    name: str | None = None
    const: np.ndarray | None = None


def const_value(array) -> Value:
    array = np.asarray(array)
    return Value(tuple(array.shape), array.dtype, identity(array.ndim), const=array)


def is_static(d) -> bool:
    return isinstance(d, (int, np.integer))


def same_dim(a, b) -> bool:
    if is_static(a) and is_static(b):
        return int(a) == int(b)
    return not is_static(a) and not is_static(b) and str(a) == str(b)


def broadcast_shape(shapes: list[tuple]) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[i] for s in shapes if len(s) == rank and not (is_static(s[i]) and s[i] == 1)]
        out.append(dims[0] if dims else 1)
    return tuple(out)


def identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def preferred_perm(rank: int) -> tuple[int, ...]:
    """NCHW-like order for rank-4 values (what ONNX convolutions consume)."""
    return (0, 3, 1, 2) if rank == 4 else identity(rank)


def _inverse_gather(src: tuple[int, ...], dst: tuple[int, ...]) -> list[int]:
    """ONNX Transpose perm taking physical order ``src`` to ``dst`` (both logical-axis lists)."""
    return [src.index(a) for a in dst]


class GraphBuilder:
    """Nodes and initializers of the graph being written, with layout and shape helpers.

    onnx_module: the imported ``onnx`` package (optional dependency, imported by the caller).
    batch_symbol: the name of the dynamic batch dimension; input_name: the graph input whose
    first dimension it is.
    """

    def __init__(self, onnx_module, batch_symbol: str, input_name: str):
        self.helper = onnx_module.helper
        self.nodes: list = []
        self.initializers: dict[str, np.ndarray] = {}
        self.batch_symbol = batch_symbol
        self.input_name = input_name
        self._batch_tensor: str | None = None
        self._count = 0
        self._const_cache: dict[tuple, str] = {}
        self._transposed: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs

    def initializer(self, array: np.ndarray, hint: str = "const") -> str:
        array = np.ascontiguousarray(array)
        # small constants (shapes, axes, scalars) recur: one initializer each
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self._const_cache:
            return self._const_cache[key]
        name = self.fresh(hint)
        self.initializers[name] = array
        if key is not None:
            self._const_cache[key] = name
        return name

    def onnx_type(self, dtype) -> int:
        return self.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def batch_tensor(self) -> str:
        if self._batch_tensor is None:
            self._batch_tensor = self.node("Shape", [self.input_name], start=0, end=1)[0]
        return self._batch_tensor

    def shape_vector(self, dims) -> str:
        """An int64 [rank] tensor holding ``dims`` (the batch symbol read from the input)."""
        for d in dims:
            if not is_static(d) and str(d) != self.batch_symbol:
                raise UnsupportedExportError(f"shape expression {d} (only the batch dimension "
                                             f"may be dynamic)")
        if all(is_static(d) for d in dims):
            return self.initializer(np.asarray([int(d) for d in dims], np.int64), "shape")
        pieces = [self.batch_tensor() if not is_static(d)
                  else self.initializer(np.asarray([int(d)], np.int64), "dim") for d in dims]
        return self.node("Concat", pieces, axis=0)[0]

    def tensor(self, v: Value, perm: tuple[int, ...] | None = None) -> str:
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

    def full(self, v: Value, shape: tuple) -> Value:
        """``v`` with every pending broadcast carried out (an ``Expand``)."""
        if len(v.shape) == len(shape) and all(map(same_dim, v.shape, shape)):
            return v
        if v.const is not None and all(is_static(d) for d in shape):
            return Value(tuple(shape), v.dtype, v.perm,
                         const=np.broadcast_to(v.const, [int(d) for d in shape]).copy())
        if len(v.shape) != len(shape):
            raise UnsupportedExportError(f"cannot expand {v.shape} to {shape}")
        phys = [shape[a] for a in v.perm]
        name = self.node("Expand", [self.tensor(v), self.shape_vector(phys)])[0]
        return Value(tuple(shape), v.dtype, v.perm, name=name)
