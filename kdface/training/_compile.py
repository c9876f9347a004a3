"""A compile-only plan of a training run for a TPU or GPU slice (issue 23): the exact step a
flagfile trains (its ``FitPlan``: recipe, networks, dtype, head placement, teacher cache or not,
relation groups), compiled for a topology JAX knows, from any machine, without data or a device.

``python -m kdface.train --flagfile=F --plan_topology=v5e:8x8`` prints ``plan_table``: per-chip HBM
from the compiled program's ``memory_analysis()`` (arguments, of which parameters + optimizer
state, temporaries, total) against the chip's capacity, the largest buffer, flops and bytes per
step from ``cost_analysis()``, the step time (the compiler's ``optimal_seconds`` where usable;
else, on TPUs, the compiler's per-op ``estimated_cycles`` summed at the chip's clock, with the
three costliest ops named (``_hlo_costs``); else a roofline), images/s per chip and for the
slice, model FLOP utilization, time per epoch, and the input rate each host must sustain.
Every figure is a compiler estimate, not a measurement, but one: the images/s one core of this
host makes with the run's input pipeline (``_input_rate``), beside the per-host rate. The
collectives, which the compiler gives no cycles, are listed with their time at the chip's
interconnect bandwidth beside the estimate. libtpu is needed for TPUs (``jax[tpu]`` at the
installed jax's version; ``make test`` installs it in ``<venv>/tpu-site``, see
``.ci/install-libtpu``), the CUDA PJRT plugin for
GPUs (``--plan_topology=h100:8``, ``h100:2x8``; ``_gpu_targets``, ``.ci/install-gpu-compiler``).
The GPU compiler reports no cost analysis: its flops and bytes are the unpartitioned program's
(XLA's HLO cost analysis) divided by the devices, and the table says so.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdface._platform import compiling_for
from kdface.training._gpu_targets import gpu_chips, gpu_count, gpu_devices
from kdface.training._plan import FitPlan

# Per-chip figures from Google Cloud's TPU documentation (system architecture pages): dense
# bf16 peak TFLOP/s, HBM capacity GiB, HBM bandwidth GB/s. Published specifications, used for the
# roofline and the capacity check; not measured here.
CHIPS = {"v4": (275.0, 32.0, 1228.0), "v5e": (197.0, 16.0, 819.0),
         "v5p": (459.0, 95.0, 2765.0), "v6e": (918.0, 32.0, 1640.0)}
# The matrix units of a chip, from the same pages: (TensorCores, MXUs per TensorCore, MXU side).
# v4 and v5p: two TensorCores of four 128x128 MXUs; v5e: one of four; v6e: one of two 256x256.
# The clock is derived, not published: peak = TensorCores x MXUs x side^2 x 2 flops x clock
# (v4 1.05 GHz, v5e 1.50, v5p 1.75, v6e 3.50). It turns the compiler's per-op cycle estimates
# into seconds; on v5p, the one generation whose compiler also reports a usable
# optimal_seconds, benchmarks/TPU_PLAN.md compares the two for every row.
MXUS = {"v4": (2, 4, 128), "v5e": (1, 4, 128), "v5p": (2, 4, 128), "v6e": (1, 2, 256)}
# The interconnect bandwidth per chip for collectives, GB/s, from the same pages: their
# "all-reduce bandwidth per Pod" over the Pod's chips (v4 1.1 PB/s / 4,096, v5e 51.2 TB/s /
# 256, v6e 102.4 TB/s / 256); v5p's page gives none: half its 1,200 GB/s bidirectional ICI, the
# ratio of v5e's (400) and v6e's (800) figures. The compiler writes no cycles for collectives;
# the plan reports the bytes each chip sends (``_hlo_costs.collectives``) at this bandwidth.
ICI = {"v4": 1.1e15 / 4096 / 1e9, "v5e": 51.2e12 / 256 / 1e9, "v5p": 600.0,
       "v6e": 102.4e12 / 256 / 1e9}
GIB = 2 ** 30
TPUS = tuple(CHIPS)


def clock_hz(chip: str) -> float | None:
    """The TensorCore clock implied by the chip's published bf16 peak and matrix units."""
    if chip not in MXUS:
        return None
    cores, mxus, side = MXUS[chip]
    return CHIPS[chip][0] * 1e12 / (cores * mxus * side * side * 2)
CHIPS.update(gpu_chips())


def chip_of(topology: str) -> str:
    """``v5e`` of ``v5e:8x8`` (also ``v5litepod``-style names are refused in one line)."""
    chip = topology.split(":", 1)[0].lower()
    if chip not in CHIPS:
        raise ValueError(f"--plan_topology={topology}: the chip {chip!r} is not one of "
                         f"{sorted(CHIPS)} (TPUs as jax.experimental.topologies spells them, "
                         f"e.g. v5e:2x2, v4:2x2x1; GPUs as h100:8 or h100:2x8)")
    return chip


def topology_mesh(topology: str) -> Mesh:
    """A 1-D ``data`` mesh over every chip of a TPU topology or GPU slice (no TPU or GPU needed:
    libtpu and the CUDA plugin compile)."""
    if chip_of(topology) not in TPUS:
        devices = gpu_devices(topology)
        return Mesh(np.asarray(devices).reshape(-1), ("data",),
                    axis_types=(jax.sharding.AxisType.Auto,))
    from jax.experimental import topologies
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # libtpu missing or an unknown topology: one line
        raise ValueError(f"--plan_topology={topology}: JAX could not describe it ({e}); "
                         f"is libtpu installed (jax[tpu] at the installed jax's version)?") from e
    return Mesh(np.asarray(devices).reshape(-1), ("data",),
                axis_types=(jax.sharding.AxisType.Auto,))


def _structs(tree, sharding_of):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=sharding_of(x)), tree)


def _placed(tree, shardings, replicated):
    """``tree``'s leaves as ``ShapeDtypeStruct``s placed as ``shardings`` (a tree of the same
    structure) says, or replicated when it is None."""
    if shardings is None:
        return _structs(tree, lambda x: replicated)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def batch_spec(plan: FitPlan, mesh: Mesh, *, teacher_width: int | None) -> dict[str, Any]:
    """The global batch the step receives, as the pipeline (and teacher cache) make it."""
    config, recipe = plan.config, plan.recipe
    b, (h, w) = config.batch_size, tuple(config.input_size)
    data = NamedSharding(mesh, P("data"))
    spec = {"student_image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=data),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data)}
    if recipe.needs_teacher:
        if config.teacher_cache:
            spec["teacher_embedding"] = jax.ShapeDtypeStruct(
                (b, teacher_width), jnp.dtype(config.teacher_cache_dtype), sharding=data)
        else:
            spec["teacher_image"] = jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=data)
    if recipe.landmark_head:
        spec["landmarks"] = jax.ShapeDtypeStruct((b, 5, 2), jnp.float32, sharding=data)
    if config.lr_on_device and recipe.student_view == "low_resolution":
        spec["student_size"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data)
    return spec


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """One compile of a plan's step: the compiled program's memory and cost analyses (per chip),
    and how the head was placed."""
    batch_size: int
    devices: int
    argument_bytes: int
    state_bytes: int          # parameters + optimizer state + BN statistics, per chip
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float              # per chip, per step
    bytes_accessed: float     # per chip, per step
    optimal_seconds: float | None
    head_sharded: bool
    largest: tuple[str, int]  # (what, bytes) of the largest argument per chip
    teacher_head_sharded: bool | None = None  # None: the step holds no teacher head
    cost_source: str = "compiled program"  # where flops and bytes come from
    # XLA:TPU's own cost model: the "estimated_cycles" of the entry's ops summed, and the three
    # most expensive ops as (kdface source line, HLO op name, cycles, flops, HBM bytes)
    cycles: int | None = None
    top_ops: tuple = ()
    # the collectives, which the compiler's cycles leave out (``_hlo_costs.Collective``)
    collectives: tuple = ()

    @property
    def total_bytes(self) -> int:
        """Per-chip HBM of the step: arguments + outputs not aliased to them (donated state is
        updated in place) + temporaries + the program itself."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)


def _per_chip(struct) -> int:
    shape = struct.sharding.shard_shape(struct.shape) if struct.sharding is not None else (
        struct.shape)
    return int(math.prod(shape)) * jnp.dtype(struct.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class LoweredStep:
    """A plan's train step lowered for a mesh, with the abstract arguments it was lowered at."""
    lowered: Any
    arguments: dict[str, Any]   # state, teacher, batch as placed ShapeDtypeStructs
    batch_size: int
    head_sharded: bool
    teacher_head_sharded: bool | None = None  # None: no teacher state with a head


def lower_step(plan: FitPlan, mesh: Mesh) -> LoweredStep:
    """Lowers the plan's train step for ``mesh`` (a TPU topology's, or any) abstractly: the
    networks by ``nnx.eval_shape``, the state and batch as ``ShapeDtypeStruct``s with their
    shardings, the trace under ``compiling_for(mesh)`` so the target's formulations are chosen."""
    from kdface.training._loop import (device_low_resolution, initial_term_states, run_optimizer,
                                       run_step_config)
    from kdface.training._networks import abstract_networks
    from kdface.training._placement import (slot_shardings, student_shardings, teacher_shardings,
                                            term_shardings)
    from kdface.training._step import init_health, make_train_step, split_student, split_teacher
    if plan.devices != mesh.size:
        raise ValueError(f"the plan is for {plan.devices} devices, the mesh has {mesh.size}")
    config, recipe = plan.config, plan.recipe
    replicated = NamedSharding(mesh, P())
    with compiling_for(mesh):
        student, teacher = abstract_networks(plan)
        param_shardings = student_shardings(plan.head, student, mesh)
        optimizer = run_optimizer(plan)
        graphdef, params, rest = split_student(student)
        opt_state = jax.eval_shape(optimizer.init, params)
        params = _placed(params, param_shardings, replicated)
        state = {"params": params, "rest": _structs(rest, lambda x: replicated),
                 "opt_state": _placed(opt_state, slot_shardings(params, opt_state, replicated),
                                      replicated),
                 "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
        step_config = run_step_config(plan, teacher_cached=bool(
            config.teacher_cache and recipe.needs_teacher), device_lr=device_low_resolution(plan),
            mesh=mesh)
        terms = jax.eval_shape(lambda: initial_term_states(plan, student))
        if terms:
            state["terms"] = _placed(terms, term_shardings(
                recipe, terms, step_config.class_sharding, replicated), replicated)
        cached = bool(config.teacher_cache and recipe.needs_teacher)
        teacher_def = teacher_state = placement = None
        if teacher is not None:
            placement = teacher_shardings(plan.head, teacher, mesh, cached=cached)
            teacher_def, teacher_state = split_teacher(teacher, cached=cached)
            teacher_state = _placed(teacher_state, placement, replicated)
        health = _structs(jax.eval_shape(lambda: init_health(recipe)), lambda x: replicated)
        width = None if teacher is None else int(teacher.backbone.embedding_size)
        batch = batch_spec(plan, mesh, teacher_width=width)
        step = make_train_step(recipe, graphdef, teacher_def, optimizer, step_config)
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(state, health, teacher_state, batch)
    has_head = teacher is not None and getattr(teacher, "head", None) is not None
    return LoweredStep(lowered, {"state": state, "teacher": teacher_state, "batch": batch},
                       config.batch_size, param_shardings is not None,
                       (placement is not None) if has_head else None)


def compile_step(plan: FitPlan, mesh: Mesh, *, keep: list | None = None) -> CompiledStep:
    """Compiles the plan's train step for ``mesh`` (``lower_step``) and reads the compiled
    program's memory and cost analyses; ``keep``, a list, receives the compiled program."""
    low = lower_step(plan, mesh)
    with compiling_for(mesh):
        compiled = low.lowered.compile()
    if keep is not None:
        keep.append(compiled)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    cost_source = "compiled program"
    if not cost:  # XLA:GPU compiled deviceless reports none
        cost, cost_source = (_unpartitioned_cost(low.lowered, mesh.size),
                             "unpartitioned HLO / devices")
    sizes = [(jax.tree_util.keystr(k), _per_chip(x))
             for k, x in jax.tree_util.tree_leaves_with_path(low.arguments)]
    optimal = cost.get("optimal_seconds")
    cycles, top, comms = None, (), ()
    if mesh.devices.flat[0].platform == "tpu":
        from kdface.training._hlo_costs import collectives, entry_costs, top_ops, total_cycles
        text = compiled.as_text()
        ops = entry_costs(text)
        cycles = total_cycles(ops) or None
        top = tuple((op.source or op.opcode, op.op_name.split("/")[-1] or op.opcode, op.cycles,
                     op.flops, op.hbm_bytes) for op in top_ops(ops, 3))
        comms = tuple(collectives(text, mesh.size))
    return CompiledStep(
        batch_size=low.batch_size, devices=mesh.size,
        argument_bytes=int(memory.argument_size_in_bytes),
        state_bytes=sum(_per_chip(x) for x in jax.tree.leaves(low.arguments["state"])),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        optimal_seconds=None if optimal is None else float(optimal),
        head_sharded=low.head_sharded, teacher_head_sharded=low.teacher_head_sharded,
        largest=max(sizes, key=lambda kv: kv[1]), cost_source=cost_source,
        cycles=cycles, top_ops=top, collectives=comms)


def _unpartitioned_cost(lowered, devices: int) -> dict[str, float]:
    """Flops and bytes per device of a lowered program whose compiler reports no cost analysis:
    XLA's HLO cost analysis of the whole (unpartitioned) program, on the host's CPU client,
    divided by the devices: a data-parallel step splits its work evenly (the collectives the
    partitioner adds are not counted)."""
    from jax._src import xla_bridge
    from jax._src.lib import xla_client
    cost = xla_client._xla.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"),
                                                    lowered.compiler_ir("hlo").get_hlo_module())
    return {"flops": float(cost.get("flops", 0.0)) / devices,
            "bytes accessed": float(cost.get("bytes accessed", 0.0)) / devices}


def chips_in(topology: str) -> int:
    """The chips a topology name counts (``v5e:8x8`` 64, ``v4:2x2x1`` 4, ``h100:2x8`` 16)."""
    if topology.split(":", 1)[0].lower() not in TPUS:
        return gpu_count(topology)
    dims = topology.split(":", 1)[1] if ":" in topology else ""
    try:
        return math.prod(int(d) for d in dims.split("x"))
    except ValueError:
        raise ValueError(f"--plan_topology={topology}: expected <chip>:<dims>, e.g. v5e:2x2")


def estimate(step: CompiledStep, chip: str, *, num_examples: int | None,
             hosts: int, chips: int | None = None) -> dict[str, Any]:
    """The plan's figures from one compile: capacity check, step time (the compiler's estimate
    where it is positive, else the roofline max(flops / peak, bytes / HBM bandwidth)), images/s
    per chip and for the slice, model FLOP utilization, epoch time and per-host input rate. All
    are estimates from the compiled program and the chip's published figures."""
    peak_tflops, hbm_gib, bandwidth_gbs = CHIPS[chip]
    # JAX may show a chip as more than one device (v4's two TensorCores): the chip's figures
    # are shared by its devices.
    share = (chips or step.devices) / step.devices
    peak_tflops, hbm_gib, bandwidth_gbs = (peak_tflops * share, hbm_gib * share,
                                           bandwidth_gbs * share)
    capacity = int(hbm_gib * GIB)
    compute_floor = step.flops / (peak_tflops * 1e12)
    roofline = max(compute_floor, step.bytes_accessed / (bandwidth_gbs * 1e9))
    # The compiler's own estimate is used only when it is positive and not below half the
    # roofline (no program beats its roofline; off v5p it has come out negative).
    usable = step.optimal_seconds is not None and step.optimal_seconds >= 0.5 * roofline > 0
    # Else the compiler's per-op cycles at the chip's clock, where it wrote them and, as for
    # optimal_seconds, they are not below half the roofline (nor the step's flops at peak: no
    # program beats its MXUs). v6e's derived 3.5 GHz clock is the least certain; its cycle
    # sums have come out below half its roofline, so its rows keep the roofline.
    clock = clock_hz(chip)
    cycle_seconds = step.cycles / clock if step.cycles and clock else None
    # The compiler's cycles leave the collectives out: their bytes at the interconnect's
    # published bandwidth, reported beside the estimate (not added to it: how much of them
    # overlaps compute is the compiler's schedule, which its cycles do not say).
    sent = sum(c.traffic * c.count for c in step.collectives)
    comm_seconds = sent / (ICI[chip] * share * 1e9) if chip in ICI else None
    cycles_usable = (not usable and cycle_seconds is not None
                     and cycle_seconds >= max(compute_floor, 0.5 * roofline) > 0)
    seconds = step.optimal_seconds if usable else cycle_seconds if cycles_usable else roofline
    label = ("compiler (optimal_seconds)" if usable else
             "compiler cycles (per-op estimated_cycles at the chip's clock; optimal_seconds "
             + ("absent" if step.optimal_seconds is None else
                f"{step.optimal_seconds:.3g}, unusable") + ")" if cycles_usable else
             "roofline (optimal_seconds " + ("absent" if step.optimal_seconds is None else
                                             f"{step.optimal_seconds:.3g}, unusable") + ")")
    from kdface.training._hlo_costs import bound
    top = [{"source": src, "op": name, "ms": 1e3 * cyc / clock, "flops": fl, "hbm_bytes": by,
            "bound": bound(fl, by, cyc / clock, peak_tflops * 1e12, bandwidth_gbs * 1e9),
            "mxu_share": fl / (peak_tflops * 1e12) / (cyc / clock)}
           for src, name, cyc, fl, by in step.top_ops] if clock else []
    per_chip_batch = step.batch_size // step.devices
    images_chip = per_chip_batch / seconds if seconds > 0 else float("inf")
    slice_rate = images_chip * step.devices
    fits = step.total_bytes <= capacity
    why = (f"{_size(step.total_bytes / GIB)} <= {hbm_gib:g} GiB" if fits else
           f"{_size(step.total_bytes / GIB)} > {hbm_gib:g} GiB; largest argument "
           f"{step.largest[0]} {_size(step.largest[1] / GIB)}, temporaries "
           f"{_size(step.temp_bytes / GIB)}")
    return {
        "chip": chip, "devices": step.devices, "chips": chips or step.devices, "hosts": hosts,
        "batch_per_chip": per_chip_batch,
        "state_gib": step.state_bytes / GIB, "arguments_gib": step.argument_bytes / GIB,
        "temporaries_gib": step.temp_bytes / GIB, "total_gib": step.total_bytes / GIB,
        "capacity_gib": hbm_gib, "fits": fits, "why": why, "head_sharded": step.head_sharded,
        "teacher_head_sharded": step.teacher_head_sharded,
        "flops_per_step": step.flops, "bytes_per_step": step.bytes_accessed,
        "cost_source": step.cost_source,
        "estimate": label, "step_seconds": seconds, "roofline_seconds": roofline,
        "cycles_seconds": cycle_seconds, "top_ops": top,
        "collective_bytes": sent, "collective_seconds": comm_seconds,
        "images_per_s_chip": images_chip, "images_per_s_slice": slice_rate,
        "mfu": step.flops / (seconds * peak_tflops * 1e12) if seconds > 0 else 0.0,
        "epoch_seconds": (num_examples / slice_rate) if num_examples and slice_rate else None,
        "images_per_s_host": slice_rate / max(hosts, 1)}


def largest_fitting_batch(compile_at, capacity_gib: float, first: CompiledStep) -> int | None:
    """The largest per-chip batch whose step fits the chip: per-chip HBM is affine in the batch
    (arguments and temporaries grow with it, the state does not), so a second compile at twice
    the batch gives the line; the batch it predicts is verified by a third compile and lowered
    by halves of the remaining step until it fits. ``compile_at(per_chip) -> CompiledStep``."""
    capacity = int(capacity_gib * GIB)
    b0 = first.batch_size // first.devices
    second = compile_at(2 * b0)
    slope = (second.total_bytes - first.total_bytes) / b0
    if slope <= 0:
        return None
    guess = int((capacity - first.total_bytes) / slope) + b0
    guess = max(1, guess)
    while guess > 1:
        if compile_at(guess).total_bytes <= capacity:
            return guess
        guess = int(guess * 0.9)
    return 1 if compile_at(1).total_bytes <= capacity else 0


def _size(gib: float) -> str:
    for unit, scale in (("GiB", 1.0), ("MiB", 2 ** -10), ("KiB", 2 ** -20)):
        if gib >= scale or unit == "KiB":
            return f"{gib / scale:.2f} {unit}"
    return f"{gib:.2f} GiB"


def plan_topology(config, topology: str, *, num_classes: int, num_examples: int | None,
                  search: bool = False, measure_input: bool = False,
                  data_dir: str | None = None) -> tuple[dict[str, Any], str]:
    """``(fields, table)`` of the compile-only plan of ``config`` on ``topology``: the plan
    (``make_plan(compile_only=True)``, every check), its final run's step compiled for the
    slice, the estimates; with ``search`` the largest per-chip batch that fits; with
    ``measure_input`` the images/s one core of this host makes with the run's input pipeline
    (``_input_rate``: the training set when built in ``data_dir``, else synthetic JPEGs)."""
    from kdface.training._plan import DataFacts, make_plan
    chip = chip_of(topology)
    mesh = topology_mesh(topology)
    hosts = len({d.process_index for d in mesh.devices.flat})
    data = DataFacts(int(num_classes), num_examples)
    plan = make_plan(config, data=data, devices=mesh.size, compile_only=True).final
    step = compile_step(plan, mesh)
    fields = estimate(step, chip, num_examples=num_examples, hosts=hosts,
                      chips=chips_in(topology))
    if search:
        def compile_at(per_chip: int) -> CompiledStep:
            bigger = config.replace(batch_size=per_chip * mesh.size)
            return compile_step(make_plan(bigger, data=data, devices=mesh.size,
                                          compile_only=True).final, mesh)
        fields["largest_batch"] = largest_fitting_batch(compile_at, fields["capacity_gib"], step)
    if measure_input:
        from kdface.training._input_rate import measured_input_rate
        measured = measured_input_rate(config, plan.recipe, data_dir=data_dir)
        fields["input_measured_on"] = measured["measured_on"]
        if "images_per_core_s" in measured:
            fields["input_per_core"] = measured["images_per_core_s"]
            fields["input_cores_per_host"] = (fields["images_per_s_host"]
                                              / measured["images_per_core_s"])
    table = format_table(fields, topology=topology, recipe=plan.recipe.name,
                         classes=int(num_classes))
    return fields, table


def format_table(fields: dict[str, Any], *, topology: str, recipe: str, classes: int) -> str:
    """The plan as one Markdown table (two columns), every figure labelled as an estimate."""
    gib = _size
    rows = [
        ("topology", f"{topology} ({fields['devices']} devices, {fields['hosts']} hosts)"),
        ("recipe, classes", f"{recipe}, {classes:,}"),
        ("head", ("sharded over the chips" if fields["head_sharded"] else "replicated")
         + {True: "; the teacher's: sharded too", False: "; the teacher's: replicated",
            None: ""}[fields.get("teacher_head_sharded")]),
        ("batch per chip", str(fields["batch_per_chip"])),
        ("per-chip HBM: parameters + optimizer state", gib(fields["state_gib"])),
        ("per-chip HBM: arguments", gib(fields["arguments_gib"])),
        ("per-chip HBM: temporaries", gib(fields["temporaries_gib"])),
        ("per-chip HBM: total", f"{gib(fields['total_gib'])} of {fields['capacity_gib']:g} GiB"),
        ("fits", ("yes" if fields["fits"] else "no") + f" ({fields['why']})"),
        ("largest per-chip batch that fits",
         str(fields.get("largest_batch", "not searched (--plan_search_batch)"))),
        ("flops per step per chip", f"{fields['flops_per_step']:.4g} "
                                    f"({fields.get('cost_source', 'compiled program')})"),
        ("step time (estimate)", f"{fields['step_seconds'] * 1e3:.3g} ms, {fields['estimate']}"),
        ("roofline", f"{fields['roofline_seconds'] * 1e3:.3g} ms"),
        ("img/s per chip (estimate)", f"{fields['images_per_s_chip']:,.0f}"),
        ("img/s for the slice (estimate)", f"{fields['images_per_s_slice']:,.0f}"),
        ("model FLOP utilization (estimate)", f"{100 * fields['mfu']:.0f} %"),
        ("time per epoch (estimate)", "unknown (no dataset size)" if fields["epoch_seconds"]
         is None else f"{fields['epoch_seconds']:.3g} s ({fields['epoch_seconds'] / 3600:.2g} h)"),
        ("input each host must sustain", f"{fields['images_per_s_host']:,.0f} img/s"),
    ]
    for i, op in enumerate(fields.get("top_ops") or [], 1):
        rows.append((f"costliest op {i} (compiler cycles)",
                     f"{op['ms']:.3g} ms, {op['op']} at {op['source']}: {op['bound']}-bound "
                     f"({op['flops']:.3g} flops, {100 * op['mxu_share']:.0f} % of MXU peak; "
                     f"{op['hbm_bytes']:.3g} HBM bytes)"))
    if fields.get("collective_bytes"):
        rows.append(("collectives (not in the compiler's cycles)",
                     f"{fields['collective_bytes'] / 1e6:,.1f} MB sent per chip per step: "
                     f"{fields['collective_seconds'] * 1e3:.3g} ms at the chip's published "
                     f"interconnect bandwidth if none of it overlaps compute"))
    if fields.get("input_per_core"):
        rows.append(("input pipeline, one core here (measured)",
                     f"{fields['input_per_core']:,.0f} img/s ({fields['input_measured_on']}): "
                     f"{fields['input_cores_per_host']:.1f} such cores per host"))
    elif fields.get("input_measured_on"):
        rows.append(("input pipeline, one core here", fields["input_measured_on"]))
    out = ["| plan | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out)
