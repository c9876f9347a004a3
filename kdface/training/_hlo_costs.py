"""The per-op cost breakdown of a compiled TPU program (issue 23, item 5): which ops of a step the
TPU compiler expects to cost most, and whether each is bound by the MXUs or by HBM.

XLA:TPU writes its own cost model's verdict into the optimized HLO: every top-level fusion,
convolution and copy carries ``"estimated_cycles"`` in its ``backend_config``. JAX exposes only
the program's totals (``cost_analysis()``), so this module reads ``compiled.as_text()``: for each
instruction of the entry computation, the compiler's cycles, its flops (the convolutions and dots
inside it, counted from their shapes as XLA's HloCostAnalysis does: 2 x output elements x the
contraction, kernel taps over the padding not counted), its HBM bytes (operands and result
outside VMEM, memory space ``S(1)``), and the source line of kdface that produced it (the
module's StackFrames table). The compiler gives collectives no cycles; ``collectives`` lists
them with the bytes each chip sends, for a time at the interconnect's bandwidth. Hand-written
because no library parses XLA's HLO text for Python (jaxlib exposes the module's totals only).
"""
from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_HEAD = re.compile(r"^\s*(?:ROOT )?%([^ ]+) = ")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([^ ]+) \(")


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]
    vmem: bool  # memory space S(1): the TensorCore's on-chip memory, not HBM

    @property
    def bytes(self) -> float:
        return math.prod(self.dims) * _DTYPE_BYTES.get(self.dtype, 4)


@dataclasses.dataclass
class Op:
    name: str
    opcode: str
    result: list[Array]
    operands: list[str]
    text: str
    cycles: int | None = None
    args: str = ""  # the text between the opcode's parentheses (a constant's value)
    flops: float = 0.0
    hbm_bytes: float = 0.0
    source: str = ""
    op_name: str = ""


def bound(flops: float, hbm_bytes: float, seconds: float, peak_flops: float,
          hbm_bytes_per_s: float) -> str:
    """What bounds an op the compiler expects to take ``seconds``: ``MXU`` or ``HBM`` when that
    side's own time (flops / peak, HBM bytes / bandwidth) is the larger and at least a quarter of
    the op's time, else ``vector unit`` (elementwise and reduction work on operands held in
    VMEM: neither the matrix units nor HBM explain its cycles)."""
    mxu, hbm = flops / peak_flops, hbm_bytes / hbm_bytes_per_s
    if max(mxu, hbm) < 0.25 * seconds:
        return "vector unit"
    return "MXU" if mxu >= hbm else "HBM"


def _arrays(shape_text: str) -> list[Array]:
    return [Array(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d),
                  bool(m.group(3) and "S(1)" in m.group(3)))
            for m in _ARRAY.finditer(shape_text) if m.group(1) in _DTYPE_BYTES]


def _split_instruction(line: str):
    """``(name, result_shape_text, opcode, operand_names, rest, arguments_text)`` of one HLO
    instruction line."""
    head = _HEAD.match(line)
    if not head:
        return None
    rest = line[head.end():]
    if rest.startswith("("):  # a tuple result: up to its matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 2:]
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += rest[i] == "("
        depth -= rest[i] == ")"
        i += 1
    operands = re.findall(r"%([^ ,()]+)", rest[:i - 1])
    return head.group(1), shape, opcode, operands, rest[i:], rest[:i - 1]


def parse_computations(text: str) -> tuple[dict[str, list[Op]], str]:
    """Every computation of an HLO module text as its ops, and the entry's name."""
    computations: dict[str, list[Op]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and line.rstrip().endswith("{"):
                current = computations.setdefault(m.group(1), [])
                if line.startswith("ENTRY"):
                    entry = m.group(1)
            continue
        if line.startswith("}"):
            current = None
            continue
        parts = _split_instruction(line)
        if parts:
            name, shape, opcode, operands, rest, args = parts
            current.append(Op(name, opcode, _arrays(shape), operands, rest, args=args))
    return computations, entry


def _stack_frames(text: str) -> dict[int, str]:
    """``stack_frame_id -> "file.py:line"`` from the module's FileNames / FileLocations /
    StackFrames tables (the innermost frame inside kdface)."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        if current is None:
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if not m:
            current = None
            continue
        current[int(m.group(1))] = m.group(2)
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    locations = {}
    for k, v in tables.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+)", v)
        ln = re.search(r"\bline=(\d+)", v)
        if f and ln:
            locations[k] = (files.get(int(f.group(1)), "?"), int(ln.group(1)))
    frames = {}
    for k, v in tables.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        parent = re.search(r"parent_frame_id=(\d+)", v)
        frames[k] = (int(loc.group(1)) if loc else 0, int(parent.group(1)) if parent else 0)
    out = {}
    for k, (loc, _) in frames.items():
        path, line = locations.get(loc, ("?", 0))
        short = path.split("/kdface/", 1)[-1] if "/kdface/" in path else path.rsplit("/", 1)[-1]
        out[k] = f"{short}:{line}"
    return out


def _valid_taps(n_in: int, n_out: int, size: int, stride: int, low: int) -> int:
    """Kernel taps that land inside the input, summed over the output positions of one spatial
    axis (taps over the padding multiply zeros; XLA's HloCostAnalysis does not count them)."""
    return sum(1 for o in range(n_out) for t in range(size) if 0 <= o * stride + t - low < n_in)


def _window_taps(op: Op, lhs: Array | None, labels: str) -> float:
    """The kernel window's taps per output element, averaged over the output (padding taps
    excluded), from ``window={size=.. stride=.. pad=..}`` and the dimension labels."""
    window = re.search(r"window=\{([^}]*)\}", op.text)
    if not window:
        return 1.0
    fields = dict(f.split("=", 1) for f in window.group(1).split() if "=" in f)
    sizes = [int(d) for d in fields.get("size", "1").split("x")]
    strides = [int(d) for d in fields["stride"].split("x")] if "stride" in fields else [1] * len(
        sizes)
    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if (
        "pad" in fields) else [(0, 0)] * len(sizes)
    lhs_spec, _, out_spec = re.split(r"_|->", labels)
    if lhs is None or "lhs_dilate" in fields or "rhs_dilate" in fields:
        return float(math.prod(sizes))
    taps = 1.0
    for axis, (size, stride, (low, _)) in enumerate(zip(sizes, strides, pads)):
        n_in = lhs.dims[lhs_spec.index(str(axis))]
        n_out = op.result[0].dims[out_spec.index(str(axis))]
        taps *= _valid_taps(n_in, n_out, size, stride, low) / n_out
    return taps


def _op_flops(op: Op, shapes: dict[str, list[Array]], computations) -> float:
    """Flops of one instruction: convolutions and dots by their shapes (2 x output elements x
    the contraction: the kernel window x the kernel's input features), nested fusions summed."""
    if op.opcode == "convolution":
        labels = re.search(r"dim_labels=([^ ,]+)", op.text)
        kernel = shapes.get(op.operands[1], [None])[0] if len(op.operands) > 1 else None
        if not labels or kernel is None or not op.result:
            return 0.0
        kernel_spec = re.split(r"_|->", labels.group(1))[1]
        features_in = kernel.dims[kernel_spec.index("i")]
        lhs = shapes.get(op.operands[0], [None])[0]
        return (2.0 * math.prod(op.result[0].dims) * features_in
                * _window_taps(op, lhs, labels.group(1)))
    if op.opcode == "dot":
        lhs = shapes.get(op.operands[0], [None])[0]
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", op.text)
        if lhs is None or not m or not op.result:
            return 0.0
        contraction = math.prod(lhs.dims[int(d)] for d in m.group(1).split(",") if d)
        return 2.0 * math.prod(op.result[0].dims) * contraction
    called = re.findall(r"(?:calls|to_apply)=%([^ ,}]+)", op.text)
    if op.opcode == "fusion" and called:
        return sum(_computation_flops(c, computations) for c in called)
    return 0.0


def _computation_flops(name: str, computations) -> float:
    ops = computations.get(name, [])
    shapes = {op.name: op.result for op in ops}
    return sum(_op_flops(op, shapes, computations) for op in ops)


def _trip_count(condition: list[Op]) -> int | None:
    """The trip count of a counted loop (JAX's ``scan``/``fori_loop``: ``i < N`` with ``i`` from
    0): the one integer constant its condition compares against, or None."""
    constants = [op for op in condition if op.opcode == "constant" and op.result
                 and op.result[0].dtype in ("s32", "s64", "u32") and not op.result[0].dims]
    compares = [op for op in condition if op.opcode == "compare" and "direction=LT" in op.text]
    if len(constants) != 1 or len(compares) != 1:
        return None
    return int(constants[0].args) if re.fullmatch(r"-?\d+", constants[0].args.strip()) else None


def _computation_cycles(name: str, computations, depth: int = 0) -> int | None:
    """The compiler's cycles of one computation: its ops' ``estimated_cycles`` summed, a counted
    loop's body times its trip count; None where a loop's trip count or an op's callee is not
    known (a conditional, a loop of unknown length)."""
    total = 0
    for op in computations.get(name, []):
        cycles = _op_cycles(op, computations, depth)
        if cycles is None:
            return None
        total += cycles
    return total


def _op_cycles(op: Op, computations, depth: int) -> int | None:
    m = re.search(r'"estimated_cycles":"(\d+)"', op.text)
    if m:
        return int(m.group(1))
    if op.opcode == "while" and depth < 8:
        body = re.search(r"body=%([^ ,]+)", op.text)
        condition = re.search(r"condition=%([^ ,]+)", op.text)
        trips = _trip_count(computations.get(condition.group(1), [])) if condition else None
        inner = _computation_cycles(body.group(1), computations, depth + 1) if body else None
        return None if trips is None or inner is None else trips * inner
    if op.opcode in ("conditional", "call"):
        return None
    return 0


def entry_costs(text: str) -> list[Op]:
    """The entry computation's instructions with the compiler's cycles, flops, HBM bytes and
    kdface source line of each (``compiled.as_text()`` of a TPU program)."""
    computations, entry = parse_computations(text)
    frames = _stack_frames(text)
    ops = computations.get(entry, [])
    shapes = {op.name: op.result for op in ops}
    for op in ops:
        cycles = _op_cycles(op, computations, 0)
        # -1: a loop or branch whose cycles are not known (see total_cycles); None: no estimate
        # written (parameters, tuples, asynchronous halves)
        op.cycles = -1 if cycles is None else cycles if cycles or op.opcode == "while" else None
        op.flops = _op_flops(op, shapes, computations)
        if op.opcode not in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant"):
            arrays = list(op.result) + [a for o in op.operands for a in shapes.get(o, [])]
            op.hbm_bytes = sum(a.bytes for a in arrays if not a.vmem)
        frame = re.search(r"stack_frame_id=(\d+)", op.text)
        op.source = frames.get(int(frame.group(1)), "") if frame else ""
        name = re.search(r'op_name="([^"]*)"', op.text)
        op.op_name = name.group(1) if name else ""
    return ops


def total_cycles(ops: list[Op]) -> int | None:
    """The compiler's cycles summed over the entry's ops, counted loops times their trip count
    (a serial sum: overlap of asynchronous copies and collectives with compute is not
    credited); None when a loop or branch has no known cycles."""
    if any(op.cycles == -1 for op in ops):
        return None
    return sum(op.cycles or 0 for op in ops)


# Collectives: the compiler writes no "estimated_cycles" for them (they move data between chips,
# not through the TensorCore), so the cycle sum leaves them out. ``collectives`` lists them
# (counted loops times their trip count) with the bytes each moves per chip under the
# bandwidth-optimal algorithm, for a time at the chip's interconnect bandwidth.
_COLLECTIVES = {"all-reduce": 2.0, "all-reduce-start": 2.0, "all-gather": 1.0,
                "all-gather-start": 1.0, "reduce-scatter": 1.0, "all-to-all": 1.0,
                "collective-permute": 1.0, "collective-permute-start": 1.0}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the program: ``opcode``, ``group`` (the chips it spans), ``array_bytes``
    (per chip: the reduced, gathered or exchanged array), ``count`` (times it runs per step)
    and ``traffic`` (bytes each chip sends per run: all-reduce 2 (n - 1) / n x the array,
    all-gather and all-to-all (n - 1) / n x the gathered array, reduce-scatter (n - 1) x its
    result, collective-permute the array)."""
    opcode: str
    group: int
    array_bytes: float
    count: int
    source: str

    @property
    def traffic(self) -> float:
        n = max(self.group, 1)
        if self.opcode.startswith("collective-permute"):
            return self.array_bytes
        if self.opcode == "reduce-scatter":
            return (n - 1) * self.array_bytes
        return _COLLECTIVES[self.opcode] * (n - 1) / n * self.array_bytes


def _group_size(text: str, devices: int) -> int:
    """The chips one replica group of a collective spans: ``{{0,1,2,3},...}``, the iota form
    ``[groups,size]<=[...]``, or ``mesh['axis_0'=4,'axis_1'=2] {'axis_0'}`` (the named axes'
    product); ``{}`` or none: every device."""
    m = re.search(r"replica_groups=(\{\{[^}]*\}|\[[0-9,]+\]<=|mesh\[([^\]]*)\] \{([^}]*)\})",
                  text)
    if not m:
        return devices
    spec = m.group(1)
    if spec.startswith("{{"):
        return len([v for v in spec[2:].split(",") if v.strip()])
    if spec.startswith("["):
        return int(spec[1:spec.index("]")].split(",")[-1])
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(2)))
    return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", m.group(3)))


def _collectives_in(name: str, computations, devices: int, times: int, depth: int,
                    frames: dict[int, str]) -> list[Collective]:
    out = []
    for op in computations.get(name, []):
        if op.opcode in _COLLECTIVES:
            arrays = [a for a in op.result if a.dtype not in ("u32", "s32") or a.dims]
            if op.opcode in ("all-gather-start", "collective-permute-start") and len(arrays) > 1:
                arrays = arrays[len(arrays) // 2:]  # (operands..., results...): the results
            frame = re.search(r"stack_frame_id=(\d+)", op.text)
            out.append(Collective(op.opcode, _group_size(op.text, devices),
                                  sum(a.bytes for a in arrays), times,
                                  frames.get(int(frame.group(1)), "") if frame else ""))
        elif op.opcode == "while" and depth < 8:
            body = re.search(r"body=%([^ ,]+)", op.text)
            condition = re.search(r"condition=%([^ ,]+)", op.text)
            trips = _trip_count(computations.get(condition.group(1), [])) if condition else None
            if body:
                out += _collectives_in(body.group(1), computations, devices,
                                       times * (trips or 1), depth + 1, frames)
    return out


def collectives(text: str, devices: int) -> list[Collective]:
    """The collectives of a compiled program's entry computation and its loops (``while``
    bodies times their trip count; 1 where it is not known), on ``devices`` chips."""
    computations, entry = parse_computations(text)
    return _collectives_in(entry, computations, devices, 1, 0, _stack_frames(text))


def top_ops(ops: list[Op], n: int = 3) -> list[Op]:
    """The ``n`` ops the compiler expects to take the most cycles."""
    return sorted((op for op in ops if op.cycles and op.cycles > 0),
                  key=lambda op: -op.cycles)[:n]
