"""A compile-only plan of a training run for a TPU slice (issue 23): the exact step a flagfile
trains (its ``FitPlan``: recipe, networks, dtype, head placement, teacher cache or not, relation
groups), compiled for a topology JAX knows, from any machine, without data or a device.

``python -m kdface.train --flagfile=F --plan_topology=v5e:8x8`` prints ``plan_table``: per-chip HBM
from the compiled program's ``memory_analysis()`` (arguments, of which parameters + optimizer
state, temporaries, total) against the chip's capacity, the largest buffer, flops and bytes per
step from ``cost_analysis()``, the compiler's own time estimate where it gives a usable one and a
roofline otherwise, images/s per chip and for the slice, model FLOP utilization, time per epoch,
and the input rate each host must sustain. Every figure is a compiler estimate, not a
measurement. libtpu is needed (``jax[tpu]`` at the installed jax's version; ``make test``
installs it in ``<venv>/tpu-site``, see ``.ci/install-libtpu``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdface._platform import compiling_for
from kdface.training._plan import FitPlan

# Per-chip figures from Google Cloud's TPU documentation (system architecture pages): dense
# bf16 peak TFLOP/s, HBM capacity GiB, HBM bandwidth GB/s. Published specifications, used for the
# roofline and the capacity check; not measured here.
CHIPS = {"v4": (275.0, 32.0, 1228.0), "v5e": (197.0, 16.0, 819.0),
         "v5p": (459.0, 95.0, 2765.0), "v6e": (918.0, 32.0, 1640.0)}
GIB = 2 ** 30


def chip_of(topology: str) -> str:
    """``v5e`` of ``v5e:8x8`` (also ``v5litepod``-style names are refused in one line)."""
    chip = topology.split(":", 1)[0].lower()
    if chip not in CHIPS:
        raise ValueError(f"--plan_topology={topology}: the chip {chip!r} is not one of "
                         f"{sorted(CHIPS)} (names as jax.experimental.topologies spells them, "
                         f"e.g. v5e:2x2, v4:2x2x1)")
    return chip


def topology_mesh(topology: str) -> Mesh:
    """A 1-D ``data`` mesh over every chip of a TPU topology (no TPU needed: libtpu compiles)."""
    chip_of(topology)
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
