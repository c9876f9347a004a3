"""Timing and memory helpers for the benchmarks (Linux).

Memory is the process resident set read from ``/proc/self/status``:

* ``VmRSS`` (current) and ``VmHWM`` (high-water mark). Writing ``5`` to
  ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS, so a case's *peak* is measured as
  ``VmHWM`` after the case minus ``VmRSS`` just before it (the *baseline*: interpreter, imported
  framework, initialized backend). Where the reset is refused, ``VmHWM`` since the process (or
  its parent, for a forked child) started is used and the row says so.
* Every case runs in its own forked child (``run_isolated``), so memory held by one case (XLA
  executables, allocator caches) never hides or inflates another's. The parent imports the
  frameworks once and never initializes their backends (forking an initialized XLA client or
  torch thread pool is unsafe); each child does, before taking its baseline.
* A watchdog in the parent reads the child's ``VmRSS`` every 20 ms and kills it past a cap, so a
  wrong size estimate cannot exhaust the shared machine.

Time is wall-clock ``time.perf_counter`` of a fwd+bwd call that blocks until the result is ready;
the median over repeats after one warm-up call (after compilation for JAX) is reported.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

MIB = 2**20


def _status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size (``VmRSS``) in bytes; 0 where /proc is unavailable."""
    return 1024 * (_status_kib("VmRSS", pid) or 0)


def hwm_bytes() -> int:
    """Peak resident set size (``VmHWM``) of this process in bytes (0 without /proc)."""
    return 1024 * (_status_kib("VmHWM") or 0)


def reset_peak() -> bool:
    """Resets ``VmHWM`` to the current RSS; False where the kernel refuses it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available_bytes() -> int:
    """``MemAvailable`` of the machine in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 1024 * int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclasses.dataclass
class Timing:
    """Median fwd+bwd seconds over ``len(times)`` repeats (after warm-up)."""

    median_s: float
    times: list[float]


def time_call(fn: Callable[[], Any], *, min_repeats: int = 3, max_repeats: int = 10,
              min_time_s: float = 1.0, max_time_s: float = 10.0, warmup: int = 1) -> Timing:
    """Runs ``fn`` (which must block until its result is computed) ``warmup`` times, then
    repeats it until at least ``min_repeats`` calls and ``min_time_s`` seconds, at most
    ``max_repeats`` calls, and stops early after ``max_time_s`` (at least one timed call)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if len(times) >= min_repeats and elapsed >= min_time_s:
            break
        if elapsed >= max_time_s:
            break
    return Timing(statistics.median(times), times)


class CaseMemory:
    """Baseline and peak RSS of one case inside its own process.

    Use as ``mem = CaseMemory(); ...compile...; mem.mark_compiled(); ...run...; mem.report()``
    after the framework has been imported *and* initialized (the baseline)."""

    def __init__(self) -> None:
        self.baseline = rss_bytes()
        self.reset_ok = reset_peak()
        self.compiled_peak: int | None = None

    def mark_compiled(self) -> None:
        self.compiled_peak = hwm_bytes()

    def report(self) -> dict[str, Any]:
        peak = hwm_bytes()
        return {
            "baseline_mib": self.baseline / MIB,
            "peak_abs_mib": peak / MIB,
            "peak_mib": (peak - self.baseline) / MIB,
            "compile_peak_mib": (None if self.compiled_peak is None
                                 else (self.compiled_peak - self.baseline) / MIB),
            "peak_reset": self.reset_ok,
        }


def _child(conn: Any, target: Callable[..., dict], args: tuple) -> None:
    try:
        result = target(*args)
    except BaseException as e:  # report, never hang the parent
        result = {"status": "error", "reason": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(limit=6)}
    try:
        conn.send(result)
    finally:
        conn.close()


def run_isolated(target: Callable[..., dict], args: tuple = (), *, timeout_s: float,
                 rss_cap_bytes: int, poll_s: float = 0.02) -> dict:
    """Runs ``target(*args) -> dict`` in a forked child and returns its dict.

    The child is killed (and a dict with ``status`` ``'timeout'`` or ``'killed'`` returned)
    when it runs past ``timeout_s`` or its RSS passes ``rss_cap_bytes``; ``max_rss_mib`` is the
    largest RSS the watchdog saw."""
    ctx = mp.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_conn, target, args), daemon=True)
    start = time.perf_counter()
    proc.start()
    child_conn.close()
    seen = 0
    result: dict | None = None
    try:
        while True:
            if parent_conn.poll(poll_s):
                try:
                    result = parent_conn.recv()
                except EOFError:
                    result = None
                break
            if not proc.is_alive():
                break
            seen = max(seen, rss_bytes(proc.pid))
            if seen > rss_cap_bytes:
                result = {"status": "killed",
                          "reason": f"RSS passed the {rss_cap_bytes / 2**30:.1f} GiB cap"}
                break
            if time.perf_counter() - start > timeout_s:
                result = {"status": "timeout", "reason": f"ran past {timeout_s:.0f} s"}
                break
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        parent_conn.close()
    if result is None:
        result = {"status": "error", "reason": f"child exited with code {proc.exitcode}"}
    result.setdefault("status", "ok")
    result["max_rss_mib"] = seen / MIB
    result["wall_s"] = time.perf_counter() - start
    return result


def machine_load() -> tuple[float, float, float]:
    """1, 5 and 15-minute load averages (``os.getloadavg``)."""
    return os.getloadavg()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def limit_cores(threads: int) -> int:
    """Pins this process to its first ``threads`` allowed cores (call it before a framework
    creates its thread pools: XLA sizes them from the affinity mask) and returns the count;
    ``threads <= 0`` leaves the affinity alone."""
    if threads <= 0:
        return cpu_count()
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, cores)
        return len(cores)
    return threads


def gemm_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """float32 ``n x n @ n x n`` GFLOP/s (2 n^3 flops, median of ``repeats``) in NumPy, JAX and
    (when importable) torch, each measured in this process: call it inside a child."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    out: dict[str, float] = {}

    def rate(fn: Callable[[], Any]) -> float:
        return flops / time_call(fn, min_repeats=repeats, max_repeats=repeats,
                                 min_time_s=0.0).median_s / 1e9

    out["numpy"] = rate(lambda: a @ a)
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(a)
    mm = jax.jit(lambda u: u @ u)
    out["jax"] = rate(lambda: mm(x).block_until_ready())
    try:
        import torch
    except ImportError:
        return out
    ta = torch.from_numpy(a)
    out["torch"] = rate(lambda: ta @ ta)
    return out
