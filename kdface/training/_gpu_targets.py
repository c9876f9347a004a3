"""NVIDIA GPUs as compile-only plan targets: XLA compiles for a GPU it does not have from the
device's description (``jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=..., topology="1x<hosts>x<gpus per host>")``, the CUDA PJRT plugin on the path,
``jax_platforms=cpu`` so that no GPU is looked for). ``.ci/install-gpu-compiler`` installs the
plugin and the CUDA compiler pieces it needs (runtime, ptxas, nvJitLink; ~0.7 GB) in
``<venv>/gpu-site``; ``make test`` does.

The descriptions are XLA's own (``xla/tools/hlo_opt/gpu_specs``, what
``StreamExecutor::CreateDeviceDescription`` reports on the device, Apache-2.0): they are data
the compiler needs, written out here because the CUDA plugin ships none and no GPU is present
to report one. Peak dense bf16 tensor-core TFLOP/s are NVIDIA's datasheet figures (H100 SXM5
989, A100 SXM4 312); memory and bandwidth are the descriptions' ``device_memory_size`` and
``memory_bandwidth``.
"""
from __future__ import annotations

import math

GIB = 2 ** 30

_H100_SXM = """gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""

_A100_SXM_80 = """gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 167936
  threads_per_core_limit: 2048
  core_count: 108
  fpus_per_core: 64
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 2039040000000
  l2_cache_size: 41943040
  clock_rate_ghz: 1.41
  device_memory_size: 85100068864
  shared_memory_per_block_optin: 166912
  cuda_compute_capability { major: 8 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA A100-SXM4-80GB"
"""

# chip name: (description, datasheet dense bf16 TFLOP/s)
_TARGETS = {"h100": (_H100_SXM, 989.0), "a100": (_A100_SXM_80, 312.0)}


def _field(description: str, name: str) -> float:
    line = next(ln for ln in description.splitlines() if ln.strip().startswith(name + ":"))
    return float(line.split(":", 1)[1])


def gpu_chips() -> dict[str, tuple[float, float, float]]:
    """``{chip: (peak bf16 TFLOP/s, memory GiB, bandwidth GB/s)}`` as ``_compile.CHIPS``."""
    return {chip: (tflops, _field(d, "device_memory_size") / GIB,
                   _field(d, "memory_bandwidth") / 1e9)
            for chip, (d, tflops) in _TARGETS.items()}


def gpu_dims(topology: str) -> tuple[int, int]:
    """``(hosts, gpus per host)`` of ``h100:8`` (one host) or ``h100:2x8``."""
    dims = topology.split(":", 1)[1] if ":" in topology else ""
    try:
        parts = [int(d) for d in dims.split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise ValueError(f"--plan_topology={topology}: a GPU slice is <gpu>:<gpus> or "
                         f"<gpu>:<hosts>x<gpus per host>, e.g. h100:8 or h100:2x8")
    return (1, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def gpu_count(topology: str) -> int:
    return math.prod(gpu_dims(topology))


def gpu_devices(topology: str):
    """The devices of a GPU slice described for the compiler (no GPU needed)."""
    chip = topology.split(":", 1)[0].lower()
    hosts, per_host = gpu_dims(topology)
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="cuda", target_config=_TARGETS[chip][0],
                                            topology=f"1x{hosts}x{per_host}").devices
    except Exception as e:  # the CUDA plugin missing: one line
        raise ValueError(f"--plan_topology={topology}: JAX could not describe it ({e}); is the "
                         f"CUDA compiler installed (.ci/install-gpu-compiler <venv python>, "
                         f"which `make test` runs)?") from e
