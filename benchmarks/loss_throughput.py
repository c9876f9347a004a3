r"""Loss throughput: kdface's JAX losses against PyTorch reference implementations (CPU).

    python -m benchmarks.loss_throughput                      # default run, 10-15 min here
    python -m benchmarks.loss_throughput --quick              # smoke run, N in {64, 128}
    python -m benchmarks.loss_throughput --losses=mmd,rkd_da --sizes=256,512 \
        --write_md=benchmarks/RESULTS.md

For every loss (``benchmarks._loss_cases.LOSSES``) and batch size N (D=512): fwd+bwd median
time over repeats after warm-up (after compilation for JAX; torch runs eager), the compile time
separately, the peak memory of the case in its own forked process (``benchmarks._measure``:
VmHWM after the case minus VmRSS before it, frameworks imported and initialized), throughput
(pair comparisons/s for PWR = M^2 / time) and speed-up ratios to each torch reference. The torch
cases of the same (loss, N) run right after kdface's, so each ratio compares runs made under the
same machine load (the 1-minute load average is recorded per case). Values are compared too:
every reference returns kdface's value, so the relative difference shows the comparison is
apples to apples.

Nothing is run that is estimated to pass the memory cap (``--rss_cap_gb``, at most 6): torch
peers by an analytic estimate of their big tensors, JAX by XLA's compiled memory analysis, and
every series by extrapolating the previous size's peak and time; a watchdog kills a case whose
RSS still passes the cap. Such cases appear in the table with the reason. torch is optional (the
``bench`` extra): without it the torch columns say so.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

from benchmarks import _measure
from benchmarks._loss_cases import (DEFAULT_MAX_N, DEFAULT_ORDER, GIB, LOSSES, Config, Impl, Loss,
                                    make_inputs)

_LOSSES = flags.DEFINE_list("losses", list(DEFAULT_ORDER),
                            f"Losses to run, from: {', '.join(DEFAULT_ORDER)}.")
_SIZES = flags.DEFINE_list("sizes", [], "Batch sizes N (default: each loss's own list, "
                           "64..4096; PWR adds 192).")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: N in {64, 128}, one timed repeat.")
_FULL = flags.DEFINE_bool("full", False, "Every N in {64, ..., 4096} for every loss (the default "
                          "runs a subset per loss that covers the targets, 10-15 min).")
_IMPLS = flags.DEFINE_list("impls", [], "Only implementations whose name contains one of these.")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding size D.")
_CLASSES = flags.DEFINE_integer("classes", 2048, "Classes C of the logit and margin losses.")
_RSS_CAP = flags.DEFINE_float("rss_cap_gb", 6.0, "Per-case memory cap in GiB (at most 6).")
_TIMEOUT = flags.DEFINE_float("timeout_s", 150.0, "Per-case wall-clock limit.")
_MAX_CALL = flags.DEFINE_float("max_call_s", 30.0, "Skip a case whose predicted fwd+bwd call "
                               "takes longer than this.")
_BUDGET = flags.DEFINE_float("budget_s", 1200.0, "Skip the remaining cases after this long.")
_THREADS = flags.DEFINE_integer(
    "threads", 1, "Cores per case: 1 pins each case's process to one core and runs torch with "
    "one thread (stable on a shared machine); 0 = all cores, default threading.")
_NO_TORCH = flags.DEFINE_bool("no_torch", False, "Run the kdface columns only.")
_WRITE_MD = flags.DEFINE_string("write_md", "", "Write the markdown report here.")
_JSON = flags.DEFINE_string("json", "", "Write the raw results (one dict per case) here.")
_REPORT_FROM = flags.DEFINE_string("report_from", "", "Only rebuild the markdown report from a "
                                   "--json file of an earlier run (no measuring).")


# --------------------------------------------------------------------- inside the child

def _timing_options(predicted_s: float | None, quick: bool) -> dict[str, Any]:
    """Repeats by the predicted call time: many for fast cases, one (no warm-up) for slow ones,
    so the whole run stays within its time budget."""
    once = dict(min_repeats=1, max_repeats=1, min_time_s=0.0, max_time_s=0.0)
    if quick:
        return dict(once, warmup=1)
    if predicted_s is None or predicted_s < 1.0:
        return dict(min_repeats=3, max_repeats=10, min_time_s=1.0, max_time_s=5.0, warmup=1)
    if predicted_s < 4.0:
        return dict(min_repeats=3, max_repeats=3, min_time_s=0.0, max_time_s=0.0, warmup=1)
    return dict(once, warmup=1 if predicted_s < 8.0 else 0)


def _run_jax(loss: Loss, impl: Impl, n: int, cfg: Config, timing: dict, cap: float) -> dict:
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jnp.zeros(8) + 1.0)
    mem = _measure.CaseMemory()
    arrays, grad_argnums = make_inputs(loss.kind, n, cfg)
    args = [jnp.asarray(a) for a in arrays]
    fn = jax.jit(jax.value_and_grad(impl.build(n, cfg), argnums=grad_argnums))
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    xla_bytes = None
    if stats is not None:
        xla_bytes = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                     + stats.output_size_in_bytes)
        # measured RSS peaks of the dense PWR ran to 1.6x the plan (allocator, scratch outside
        # the plan): keep a 2x margin
        if 2.0 * xla_bytes > cap:
            return {"status": "skipped", "compile_s": compile_s,
                    "reason": f"XLA plans {xla_bytes / GIB:.1f} GiB of buffers; 2x that "
                              f"passes the {cap / GIB:.1f} GiB cap"}
    mem.mark_compiled()
    out: list = []

    def call() -> None:
        out[:] = [jax.block_until_ready(compiled(*args))]

    t = _measure.time_call(call, **timing)
    return {"status": "ok", "time_s": t.median_s, "times": t.times, "compile_s": compile_s,
            "value": float(out[0][0]),
            "xla_mib": None if xla_bytes is None else xla_bytes / _measure.MIB, **mem.report()}


def _run_torch(loss: Loss, impl: Impl, n: int, cfg: Config, timing: dict, cap: float) -> dict:
    import torch

    torch.set_num_threads(_measure.cpu_count())
    torch.zeros(8).sum().item()
    mem = _measure.CaseMemory()
    arrays, grad_argnums = make_inputs(loss.kind, n, cfg)
    tensors = [torch.from_numpy(a) for a in arrays]
    if loss.kind == "head":
        tensors[2] = tensors[2].long()
    fn = impl.build(n, cfg)
    out: list = []

    def call() -> None:
        args = [a.detach().requires_grad_() if i in grad_argnums else a
                for i, a in enumerate(tensors)]
        value = fn(*args)
        value.backward()
        out[:] = [value.item()]

    t = _measure.time_call(call, **timing)
    return {"status": "ok", "time_s": t.median_s, "times": t.times, "compile_s": None,
            "value": out[0], **mem.report()}


def _run_case(loss_key: str, impl_name: str, n: int, cfg: Config, timing: dict,
              cap: float) -> dict:
    _measure.limit_cores(cfg.threads)
    loss = LOSSES[loss_key]
    impl = loss.impl(impl_name)
    runner = _run_jax if impl.framework == "jax" else _run_torch
    return runner(loss, impl, n, cfg, timing, cap)


# ------------------------------------------------------------------------- the parent

class Planner:
    """Decides, before running, whether a case fits the memory cap and the time limits."""

    def __init__(self, cap: float, max_call_s: float, budget_s: float) -> None:
        self.cap, self.max_call_s, self.budget_s = cap, max_call_s, budget_s
        self.start = time.perf_counter()
        self.history: dict[tuple[str, str], list[dict]] = {}

    def record(self, loss: Loss, impl: Impl, n: int, result: dict) -> None:
        self.history.setdefault((loss.key, impl.name), []).append(dict(result, n=n))

    def predicted_time(self, loss: Loss, impl: Impl, n: int) -> float | None:
        done = [r for r in self.history.get((loss.key, impl.name), []) if r["status"] == "ok"]
        if not done:
            return None
        last = done[-1]
        return last["time_s"] * (n / last["n"]) ** impl.time_exp

    def skip_reason(self, loss: Loss, impl: Impl, n: int, cfg: Config, full: bool
                    ) -> str | None:
        if impl.limit is not None and (reason := impl.limit(n)):
            return reason
        scope = None if full else DEFAULT_MAX_N.get((loss.key, impl.name))
        if scope is not None and n > scope:
            return f"run to N={scope} by default (--full runs every N)"
        past = self.history.get((loss.key, impl.name), [])
        failed = [r for r in past if r["status"] != "ok"]
        if failed and failed[-1].get("skip_kind") != "static":
            return f"N={failed[-1]['n']} already {failed[-1]['status']}"
        done = [r for r in past if r["status"] == "ok"]
        last = done[-1] if done else None
        need = 0.0
        if impl.mem_bytes is not None:
            # analytic estimate, calibrated by the last measured size when that was larger
            need = impl.mem_bytes(n, cfg)
            if last is not None:
                measured = max(0.0, last["peak_mib"]) * _measure.MIB
                need *= max(1.0, measured / impl.mem_bytes(last["n"], cfg))
            if need > self.cap:
                return f"needs ~{need / GIB:.1f} GiB (estimated) > {self.cap / GIB:.0f} GiB cap"
        elif last is not None:
            # the smallest size's peak is mostly fixed cost (compilation, runtime): only the
            # part above it is scaled
            base = max(0.0, min(r["peak_mib"] for r in done)) * _measure.MIB
            grow = max(0.0, last["peak_mib"] * _measure.MIB - base)
            need = base + grow * (n / last["n"]) ** impl.mem_exp
            if need > self.cap:
                return (f"peak extrapolated from N={last['n']} (~N^{impl.mem_exp:g}): "
                        f"{need / GIB:.1f} GiB > {self.cap / GIB:.0f} GiB cap")
            need = min(need, self.cap)
        if last is not None and n not in impl.always_n:
            t = self.predicted_time(loss, impl, n)
            if t is not None and t > self.max_call_s:
                return (f"fwd+bwd extrapolated from N={last['n']} (~N^{impl.time_exp:g}): "
                        f"{t:.0f} s > {self.max_call_s:.0f} s per call")
        avail = _measure.mem_available_bytes()
        if avail and need + 1.5 * GIB > avail:
            return f"machine memory busy ({avail / GIB:.1f} GiB available)"
        if time.perf_counter() - self.start > self.budget_s:
            return f"run budget of {self.budget_s:.0f} s used up"
        return None


def _torch_available() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"torch not installed ({e}); install the 'bench' extra: pip install 'kdface[bench]'"
    return None


def _fresh_baseline(code: str) -> float | None:
    """VmRSS (MiB) of a fresh interpreter after ``code`` (imports + backend init)."""
    script = (code + "\nfrom benchmarks._measure import rss_bytes, MIB\n"
              "print(rss_bytes() / MIB)")
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=180, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def _git_state() -> str:
    """``HEAD`` of the checkout, with a note when kdface/ or benchmarks/ differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "kdface", "benchmarks"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (with uncommitted changes in kdface/ or benchmarks/)" if dirty else "")


def _machine(torch_missing: str | None, cfg: Config) -> dict[str, Any]:
    import jax
    import numpy as np

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": _measure.cpu_count(),
        "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
        "mem_available_gib": _measure.mem_available_bytes() / GIB,
        "python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
        "load_start": _measure.machine_load(),
    }
    if torch_missing is None:
        import torch
        info["torch"] = torch.__version__
    info["git"] = _git_state()
    def gemm(threads: int) -> dict:
        _measure.limit_cores(threads)
        return {"gflops": _measure.gemm_gflops()}

    for label, threads in (("gemm_gflops", cfg.threads), ("gemm_gflops_all", 0)):
        if label == "gemm_gflops_all" and cfg.threads <= 0:
            break
        res = _measure.run_isolated(gemm, (threads,), timeout_s=300, rss_cap_bytes=2 * GIB)
        info[label] = res.get("gflops", {})
    info["jax_baseline_mib"] = _fresh_baseline(
        "import jax, jax.numpy as jnp, kdface.losses\njnp.zeros(8).block_until_ready()")
    if torch_missing is None:
        info["torch_baseline_mib"] = _fresh_baseline("import torch\ntorch.zeros(8).sum()")
    return info


def _cases(selected: list[str], sizes: list[int], impl_filter: list[str], quick: bool,
           full: bool) -> list[tuple[Loss, int, Impl]]:
    out = []
    for key in selected:
        loss = LOSSES[key]
        ns = sizes or ((64, 128) if quick else loss.full_sizes if full else loss.sizes)
        for n in ns:
            for impl in loss.impls:
                if impl_filter and not any(f in impl.name for f in impl_filter):
                    continue
                out.append((loss, n, impl))
    return out


def run(selected: list[str], sizes: list[int], *, cfg: Config, cap: float, timeout_s: float,
        max_call_s: float, budget_s: float, quick: bool, full: bool, impl_filter: list[str],
        no_torch: bool) -> tuple[list[dict], dict[str, Any]]:
    """Runs the cases (each in its own forked child) and returns ``(results, machine)``."""
    torch_missing = "disabled by --no_torch" if no_torch else _torch_available()
    if torch_missing:
        print(f"NOTE: torch columns skipped: {torch_missing}", flush=True)
    else:
        import benchmarks.torch_reference  # noqa: F401  (imported once, before forking)
    import kdface.losses  # noqa: F401
    machine = _machine(torch_missing, cfg)
    machine["torch_missing"] = torch_missing
    print(f"machine: {json.dumps(machine, default=str)}", flush=True)
    planner = Planner(cap, max_call_s, budget_s)
    results = []
    for loss, n, impl in _cases(selected, sizes, impl_filter, quick, full):
        row = {"loss": loss.key, "impl": impl.name, "framework": impl.framework,
               "role": impl.role, "n": n, "load": _measure.machine_load()[0]}
        reason = (torch_missing if impl.framework == "torch" and torch_missing
                  else planner.skip_reason(loss, impl, n, cfg, full))
        if reason:
            static = impl.limit is not None and impl.limit(n) is not None
            row.update(status="skipped", reason=reason,
                       skip_kind="static" if static or torch_missing else "cost")
        else:
            timing = _timing_options(planner.predicted_time(loss, impl, n), quick)
            row.update(_measure.run_isolated(
                _run_case, (loss.key, impl.name, n, cfg, timing, cap), timeout_s=timeout_s,
                rss_cap_bytes=int(cap)))
        planner.record(loss, impl, n, row)
        results.append(row)
        print(_progress(row), flush=True)
    machine["load_end"] = _measure.machine_load()
    machine["elapsed_s"] = time.perf_counter() - planner.start
    return results, machine


def _progress(row: dict) -> str:
    head = f"{row['loss']:>18} N={row['n']:<5} {row['impl']:<26}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('reason', '')}"
    comp = "" if row["compile_s"] is None else f" compile {row['compile_s']:.2f}s"
    return (f"{head} {row['time_s'] * 1e3:10.1f} ms x{len(row['times'])}{comp} "
            f"peak {row['peak_mib']:.0f} MiB value {row['value']:.6g} load {row['load']:.1f}")


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # a CPU benchmark: no accelerator probing
    from benchmarks import _report

    if _REPORT_FROM.value:
        with open(_REPORT_FROM.value) as f:
            saved = json.load(f)
        conf = saved["machine"].get("config", {})
        cfg = Config(dim=conf.get("dim", 512), classes=conf.get("classes", 2048),
                     threads=conf.get("threads", 1))
        report = _report.markdown(saved["results"], saved["machine"], cfg)
        print(report)
        if _WRITE_MD.value:
            with open(_WRITE_MD.value, "w") as f:
                f.write(report)
        return
    unknown = [k for k in _LOSSES.value if k not in LOSSES]
    if unknown:
        raise app.UsageError(f"unknown losses {unknown}; choose from {list(LOSSES)}")
    cap_gb = _RSS_CAP.value
    if not 0 < cap_gb <= 6.0:
        raise app.UsageError("--rss_cap_gb must be in (0, 6]: the machine is shared")
    cfg = Config(dim=_DIM.value, classes=_CLASSES.value, threads=_THREADS.value)
    sizes = [int(s) for s in _SIZES.value]
    results, machine = run(
        list(_LOSSES.value), sizes, cfg=cfg, cap=cap_gb * GIB, timeout_s=_TIMEOUT.value,
        max_call_s=_MAX_CALL.value, budget_s=_BUDGET.value, quick=_QUICK.value, full=_FULL.value,
        impl_filter=list(_IMPLS.value), no_torch=_NO_TORCH.value)
    command = "python -m benchmarks.loss_throughput " + " ".join(sys.argv[1:])
    machine["command"] = command.strip()
    machine["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine["config"] = dict(dim=cfg.dim, classes=cfg.classes, threads=cfg.threads,
                             rss_cap_gb=cap_gb,
                             timeout_s=_TIMEOUT.value, max_call_s=_MAX_CALL.value)
    report = _report.markdown(results, machine, cfg)
    print(report)
    if _WRITE_MD.value:
        with open(_WRITE_MD.value, "w") as f:
            f.write(report)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
