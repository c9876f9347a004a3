"""Markdown report of ``benchmarks.loss_throughput``: machine, memory targets, tables."""
from __future__ import annotations

from benchmarks._loss_cases import LOSSES, PWR_VARIANTS, Config, Loss

GIB_MIB = 1024.0
# float32 GEMM flops of one fwd+bwd (gradient w.r.t. the student / embeddings and head), used
# for the "GEMM floor" column: the time the machine's measured GEMM rate needs for them alone.
GEMM_FLOPS = {
    # forward xx, yy, xy blocks + backward through xx (both sides) and xy: ~6 GEMMs of 2 N^2 D
    "mmd": lambda n, cfg: 6 * 2.0 * n * n * cfg.dim,
    "cosface": lambda n, cfg: 3 * 2.0 * n * cfg.classes * cfg.dim,
    "arcface": lambda n, cfg: 3 * 2.0 * n * cfg.classes * cfg.dim,
}


def _index(results: list[dict]) -> dict[tuple[str, str, int], dict]:
    return {(r["loss"], r["impl"], r["n"]): r for r in results}


def _ok(row: dict | None) -> bool:
    return row is not None and row.get("status") == "ok"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def _mib(mib: float) -> str:
    return f"{mib / GIB_MIB:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def _ratio(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def _rate(x: float) -> str:
    return f"{x:.2e}"


def _peer(loss: Loss):
    return next((i for i in loss.impls if i.role in ("peer", "both")), None)


def extrapolated_time(loss: Loss, impl_name: str, n: int, idx: dict, cfg: Config
                      ) -> tuple[float | None, str]:
    """Time of ``impl_name`` at ``n``: measured, else scaled from the largest measured N by the
    loss's work count (M^2 for PWR, N^2 for MK-MMD, N^3 for RKD-A), with a label saying so."""
    row = idx.get((loss.key, impl_name, n))
    if _ok(row):
        return row["time_s"], "measured"
    done = [r for (k, i, m), r in idx.items()
            if k == loss.key and i == impl_name and m < n and _ok(r)]
    if not done:
        return None, "not measured"
    last = max(done, key=lambda r: r["n"])
    scale = loss.work(n, cfg) / loss.work(last["n"], cfg)
    return last["time_s"] * scale, f"extrapolated from N={last['n']} by {loss.work_unit}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def targets(results: list[dict], machine: dict, cfg: Config) -> list[str]:
    idx = _index(results)
    base = machine.get("jax_baseline_mib") or 0.0
    lines = ["| target (fwd+bwd, D=512) | measured | verdict |", "|---|---|---|"]
    for key in PWR_VARIANTS:
        row = idx.get((key, "kdface tiled", 512))
        name = LOSSES[key].title
        if _ok(row):
            total = base + row["peak_mib"]
            lines.append(f"| PWR tiled N=512 peak process memory < 1.5 GB ({name}) | "
                         f"{_mib(total)} = JAX-only process baseline {_mib(base)} + case peak "
                         f"{_mib(row['peak_mib'])}; {_ms(row['time_s'])} | "
                         f"{_verdict(total * 2**20 < 1.5e9)} |")
        else:
            why = row.get("reason", row.get("status")) if row else "not run"
            lines.append(f"| PWR tiled N=512 peak < 1.5 GB ({name}) | {why} | "
                         f"{_verdict(False if row else None)} |")
    row = idx.get(("pwr_exp_tdiff", "kdface sorted", 512))
    lines.append("| PWR sorted (exp, teacher-diff) N=512 < 0.5 s | "
                 + (f"{_ms(row['time_s'])} | {_verdict(row['time_s'] < 0.5)} |" if _ok(row)
                    else f"{row.get('reason', row.get('status')) if row else 'not run'} | "
                         f"{_verdict(False if row else None)} |"))
    row = idx.get(("pwr_exp_tdiff", "kdface sorted", 4096))
    lines.append("| PWR sorted (exp, teacher-diff) N=4096 (M = 8.4 M) completes | "
                 + (f"{_ms(row['time_s'])}, peak {_mib(row['peak_mib'])}, compile "
                    f"{row['compile_s']:.1f} s | **met** |" if _ok(row)
                    else f"{row.get('reason', row.get('status')) if row else 'not run'} | "
                         f"{_verdict(False if row else None)} |"))
    for key in PWR_VARIANTS:
        loss = LOSSES[key]
        row = idx.get((key, "kdface tiled", 192))
        ref, how = extrapolated_time(loss, "torch dense (official)", 192, idx, cfg)
        if _ok(row) and ref is not None:
            r = ref / row["time_s"]
            lines.append(f"| PWR tiled N=192 >= 10x faster than dense torch ({loss.title}) | "
                         f"{_ms(row['time_s'])} vs {_ms(ref)} ({how}): {_ratio(r)} | "
                         f"{_verdict(r >= 10)} |")
        else:
            lines.append(f"| PWR tiled N=192 >= 10x vs dense torch ({loss.title}) | "
                         f"missing data | n/a |")
    loss = LOSSES["mmd"]
    row = idx.get(("mmd", "kdface", 512))
    ref, how = extrapolated_time(loss, "torch broadcast (library)", 512, idx, cfg)
    best = idx.get(("mmd", "torch GEMM", 512))
    if _ok(row) and ref is not None:
        r = ref / row["time_s"]
        lines.append(f"| MK-MMD N=512 >= 100x faster than the broadcast formulation | "
                     f"{_ms(row['time_s'])} vs {_ms(ref)} ({how}): {_ratio(r)} | "
                     f"{_verdict(r >= 100)} |")
    else:
        lines.append("| MK-MMD N=512 >= 100x vs broadcast | missing data | n/a |")
    if _ok(row) and _ok(best):
        r = best["time_s"] / row["time_s"]
        lines.append(f"| MK-MMD N=512 no slower than best-effort torch (GEMM) | "
                     f"{_ms(row['time_s'])} vs {_ms(best['time_s'])}: {_ratio(r)} | "
                     f"{_verdict(r >= 1.0)} |")
    row = idx.get(("rkd_da", "kdface", 512))
    peer = idx.get(("rkd_da", "torchdistill", 512))
    if _ok(row) and _ok(peer):
        r = peer["time_s"] / row["time_s"]
        m = peer["peak_mib"] / max(row["peak_mib"], 1e-9)
        lines.append(f"| RKD-D+A N=512 >= 5x faster than torchdistill's formulation | "
                     f"{_ms(row['time_s'])} vs {_ms(peer['time_s'])}: {_ratio(r)} | "
                     f"{_verdict(r >= 5)} |")
        lines.append(f"| RKD-D+A N=512 peak <= 1/4 of torchdistill's | {_mib(row['peak_mib'])} "
                     f"vs {_mib(peer['peak_mib'])}: 1/{m:.1f} | {_verdict(m >= 4)} |")
    else:
        lines.append("| RKD-D+A N=512 vs torchdistill | missing data | n/a |")
    return lines


def auto_choices(key: str, sizes: list[int]) -> str:
    """Which concrete method ``pwr_loss(method='auto')`` resolves to at each N (not timed
    separately: it runs exactly the row of that method)."""
    try:
        from kdface.losses import _pwr, _pwr_common
        options = PWR_VARIANTS[key]
        inv = _pwr_common.Inversion(options["inversion"], 1.0, 1.0)
        bound = _pwr_common.value_range_bound("cosine", options["margin"],
                                              options["margin_value"])
        picks = [f"N={n}: {_pwr.resolve_method('auto', n * (n - 1) // 2, inv, bound)}"
                 for n in sizes]
    except Exception as e:   # the report must not fail on an internal API change
        return f"`method='auto'`: could not resolve ({type(e).__name__}: {e})."
    return "`method='auto'` picks " + ", ".join(picks) + "."


def loss_table(loss: Loss, results: list[dict], machine: dict, cfg: Config) -> list[str]:
    idx = _index(results)
    rows = [r for r in results if r["loss"] == loss.key]
    if not rows:
        return []
    peer = _peer(loss)
    gemm_rate = (machine.get("gemm_gflops") or {}).get("jax")
    floor = GEMM_FLOPS.get(loss.key)
    head = ("| N | implementation | fwd+bwd | runs | compile | peak | "
            f"{loss.work_unit}/s | x vs peer | x vs best-effort | value rel. diff | load |")
    sep = "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if floor and gemm_rate:
        head += " GEMM floor |"
        sep += "---:|"
    out = [f"### {loss.title}", ""]
    if loss.notes:
        out += [loss.notes, ""]
    if loss.key in PWR_VARIANTS:
        out += [auto_choices(loss.key, sorted({r["n"] for r in rows})), ""]
    out += [head, sep]
    for n in sorted({r["n"] for r in rows}):
        kd_value = next((r["value"] for r in rows
                         if r["n"] == n and r["role"] == "kdface" and _ok(r)), None)
        for impl in loss.impls:
            r = idx.get((loss.key, impl.name, n))
            if r is None:
                continue
            cells = [str(n), impl.name + (f" ({impl.role})" if impl.framework == "torch" else "")]
            if not _ok(r):
                reason = r.get("reason", "")
                cells += [f"{r['status']}: {reason}"] + [""] * 8
                if floor and gemm_rate:
                    cells.append("")
                out.append("| " + " | ".join(cells) + " |")
                continue
            t = r["time_s"]
            vs_peer = vs_best = None
            if impl.role == "kdface":
                p = idx.get((loss.key, peer.name, n)) if peer else None
                vs_peer = p["time_s"] / t if _ok(p) else None
                b = idx.get((loss.key, impl.matches, n)) if impl.matches else None
                vs_best = b["time_s"] / t if _ok(b) else None
            diff = ""
            if kd_value is not None and kd_value != 0:
                diff = f"{abs(r['value'] - kd_value) / abs(kd_value):.1e}"
            comp = "eager" if r["compile_s"] is None else f"{r['compile_s']:.1f} s"
            cells += [_ms(t), str(len(r["times"])), comp, _mib(max(r["peak_mib"], 0.0)),
                      _rate(loss.work(n, cfg) / t), _ratio(vs_peer), _ratio(vs_best), diff,
                      f"{r['load']:.1f}"]
            if floor and gemm_rate:
                cells.append(_ms(floor(n, cfg) / (gemm_rate * 1e9)))
            out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def markdown(results: list[dict], machine: dict, cfg: Config) -> str:
    g = machine.get("gemm_gflops") or {}
    gemm = ", ".join(f"{k} {v:.1f}" for k, v in g.items()) or "not measured"
    g_all = machine.get("gemm_gflops_all") or {}
    threads = machine.get("config", {}).get("threads", 1)
    if g_all:
        gemm = (f"{gemm} GFLOP/s on the {threads} pinned core(s) the cases use; "
                + ", ".join(f"{k} {v:.1f}" for k, v in g_all.items()) + " on all cores")
    else:
        gemm += " GFLOP/s"
    load0 = ", ".join(f"{x:.1f}" for x in machine.get("load_start", ()))
    load1 = ", ".join(f"{x:.1f}" for x in machine.get("load_end", ()))
    torch_line = machine.get("torch_missing") or f"torch {machine.get('torch')} (CPU, eager)"
    thread_note = (f"each case process is pinned to {threads} core(s), torch uses {threads} "
                   "thread(s)" if threads > 0 else "all cores, default threading")
    lines = [
        "# Loss throughput: kdface (JAX) vs PyTorch references, CPU",
        "",
        f"Produced by `{machine.get('command', 'python -m benchmarks.loss_throughput')}` on "
        f"{machine.get('date', '?')} (wall time {machine.get('elapsed_s', 0) / 60:.1f} min).",
        "",
        f"- Machine: {machine.get('cpu')}, **{machine.get('cores')} CPU cores shared with other "
        f"agents working at the same time** (1/5/15-min load average {load0} at the start, "
        f"{load1} at the end; the per-case 1-minute load is in the tables), "
        f"{machine.get('mem_total_gib', 0):.0f} GiB RAM "
        f"({machine.get('mem_available_gib', 0):.0f} GiB available at the start).",
        f"- float32 GEMM, 2048 x 2048 @ 2048 x 2048: **{gemm}** (the roofline context: "
        "no GEMM-bound loss can beat it; the *GEMM floor* columns use JAX's rate).",
        f"- Threads: {thread_note}. "
        "On this oversubscribed machine multi-threaded runs measured mostly the scheduler "
        "(torch's OpenMP regions waited up to 0.3 s for descheduled threads), so the default "
        "pins both frameworks to one core: the ratios compare equal resources.",
        f"- Python {machine.get('python')}, JAX {machine.get('jax')}, NumPy "
        f"{machine.get('numpy')}, {torch_line}; kdface at commit {machine.get('git', '?')}.",
        f"- D = {cfg.dim}; logit and margin losses use C = {cfg.classes} classes. Inputs: "
        "teacher ~ N(0, 1), student = 0.8 teacher + 0.6 noise (float32).",
        "",
        "How it is measured (`benchmarks/_measure.py`):",
        "",
        "- **fwd+bwd**: median wall time of a value-and-gradient call (gradient w.r.t. the "
        "student; embeddings and head weights for the margin losses) after one warm-up call; "
        "JAX is compiled ahead of time (`jit(...).lower().compile()`, its time is the *compile* "
        "column); torch runs eager. *runs* is the number of timed calls (fewer for slow cases).",
        "- **peak**: every case runs in its own forked process; peak = `VmHWM` after the case "
        "(reset through `/proc/self/clear_refs` once the framework is imported and initialized) "
        "minus `VmRSS` at that point, so it counts inputs, compilation, the compiled program and "
        "the working memory, not the framework import. Baselines of a fresh process: JAX + "
        f"kdface.losses initialized {machine.get('jax_baseline_mib') or 0:.0f} MiB, torch "
        f"initialized {machine.get('torch_baseline_mib') or 0:.0f} MiB.",
        "- **x vs peer / best-effort**: torch time / kdface time at the same N, measured right "
        "after each other. *peer* = the public reference code's formulation; *best-effort* = "
        "kdface's algorithm written in PyTorch (for PWR, the same method as the row's).",
        "- **value rel. diff**: |value - kdface value| / |kdface value|: every reference "
        "computes kdface's definition, so this checks that the comparison is apples to apples.",
        f"- Nothing estimated to need more than {machine.get('config', {}).get('rss_cap_gb', 6)} "
        "GiB runs (analytic estimates for the big-tensor peers, XLA's buffer plan, "
        "extrapolation from the previous N, an RSS watchdog); cases predicted to take more than "
        f"{machine.get('config', {}).get('max_call_s', 30):.0f} s per call are skipped. Skipped "
        "rows give the reason.",
        "",
        "## Targets",
        "",
        *targets(results, machine, cfg),
        "",
        "## Tables",
        "",
    ]
    seen = []
    for r in results:
        if r["loss"] not in seen:
            seen.append(r["loss"])
    for key in seen:
        lines += loss_table(LOSSES[key], results, machine, cfg)
    return "\n".join(lines) + "\n"

