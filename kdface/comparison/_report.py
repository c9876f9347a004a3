"""The comparison's one table: mean ± std over seeds of every row, markdown, JSON and plots.

Every number aggregated here was computed by ``kdface.evaluation.compare`` for one (method,
seed) workdir; this module only averages over seeds. The spread is the sample standard
deviation over seeds (ddof = 1). "Beyond the seed spread" is the stated rule
``|mean_m - mean_self| > std_m + std_self`` against the self-studied student.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdface.comparison._methods import PAPER_LABELS, PAPERS, Method

BASELINE = "self_studied"


def _stats(values: Sequence[float | None]) -> dict[str, Any] | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)),
            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


def _get(mapping: Mapping[str, Any], key: float) -> Any:
    return mapping.get(f"{key:g}", mapping.get(str(key)))


def _supported_fars(sets: Mapping[str, Any], far_targets: Sequence[float]) -> dict[str, list]:
    """Per set, the FARs its smallest nine-fold training split can set (>= 1/FAR negatives)."""
    return {name: [f for f in far_targets if f * info["min_train_negatives"] + 1e-9 >= 1.0]
            for name, info in sets.items()}


def _aggregate(entries: list[dict[str, Any]], spec, supported) -> dict[str, Any]:
    """Mean ± std over the seeds of one method."""
    out: dict[str, Any] = {"seeds": [e["seed"] for e in entries], "verification": {}}
    for set_name in supported:
        vers = [e["evaluation"].get("verification", {}).get(set_name) for e in entries]
        vers = [v for v in vers if v is not None]
        if not vers:
            continue
        agg = {"hr": _stats([v["hr"]["accuracy"] for v in vers]),
               "lr": {str(s): _stats([v["lr"].get(str(s), {}).get("accuracy") for v in vers])
                      for s in spec.lr_sizes},
               "tar_at_far": {f"{f:g}": _stats([_get(v["hr"]["tar_at_far"], f) for v in vers])
                              for f in supported[set_name]}}
        out["verification"][set_name] = agg
    aligned = [e["evaluation"]["alignment"] for e in entries if "alignment" in e["evaluation"]]
    if aligned:
        # A diverged landmark head gives NaN (stored as null): said, not averaged away.
        out["alignment_nrmse"] = _stats([a.get("nrmse") for a in aligned]) or {
            "non_finite": len(aligned)}
    model = next((e["evaluation"]["model"] for e in entries if e["evaluation"].get("model")),
                 None)
    if model is not None:
        out["model"] = {k: model[k] for k in ("params", "macs", "input_size") if k in model}
    out["train_images_per_s"] = _stats([e["train"].get("images_per_s") for e in entries])
    out["train_seconds"] = _stats([e["train"].get("seconds") for e in entries])
    return out


def _verdict(m: dict[str, Any] | None, base: dict[str, Any] | None) -> dict[str, Any] | None:
    if m is None or base is None or m["n"] < 2 or base["n"] < 2:
        return None
    delta = m["mean"] - base["mean"]
    spread = m["std"] + base["std"]
    word = "better" if delta > spread else "worse" if delta < -spread else "within spread"
    return {"delta": delta, "spread": spread, "verdict": word}


def build_report(spec, methods: Sequence[Method], rows: list[dict[str, Any]],
                 teacher: dict[str, Any] | None, *, seconds: float) -> dict[str, Any]:
    """The comparison report (``report.json``): settings, per-method aggregates, per-row
    results and statuses, verdicts against the self-studied student."""
    sets = next((r["sets"] for r in rows if r.get("status") == "done"),
                teacher["sets"] if teacher else {})
    supported = _supported_fars(sets, spec.far_targets)
    per_method: dict[str, Any] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method.name]
        done = [r for r in mine if r["status"] == "done"]
        entry: dict[str, Any] = {
            "paper": method.paper, "paper_label": PAPER_LABELS[method.paper],
            "citation": PAPERS[method.paper],
            "equation": method.equation, "adds": method.adds, "note": method.note,
            "init_from": method.init_from, "uses_teacher": method.uses_teacher,
            "overrides": dict(method.overrides),
            "command": mine[0]["command"] if mine else None,
            "status": ("done" if len(done) == len(mine) and mine else
                       mine[0]["status"] if not done and mine else "partial"),
            "reasons": sorted({r["reason"] for r in mine if r.get("reason")})}
        if done:
            entry.update(_aggregate(done, spec, supported))
        per_method[method.name] = entry
    base = per_method.get(BASELINE, {})
    for name, entry in per_method.items():
        if name == BASELINE or "verification" not in entry or "verification" not in base:
            continue
        verdicts = {}
        for set_name, agg in entry["verification"].items():
            b = base["verification"].get(set_name)
            if b is None:
                continue
            verdicts[set_name] = {
                "hr": _verdict(agg["hr"], b["hr"]),
                "lr": {s: _verdict(agg["lr"].get(s), b["lr"].get(s)) for s in agg["lr"]}}
        entry["vs_self_studied"] = verdicts
    teacher_entry = None
    if teacher is not None:
        ev = teacher["evaluation"]
        teacher_entry = {"source": spec.teacher, "verification": {
            s: {"hr": v["hr"]["accuracy"],
                "lr": {k: r["accuracy"] for k, r in v["lr"].items()},
                "tar_at_far": {f"{f:g}": _get(v["hr"]["tar_at_far"], f)
                               for f in supported.get(s, [])}}
            for s, v in ev.get("verification", {}).items()}, "model": ev.get("model")}
    common = {k: v for k, v in dict(spec.common).items()}
    return {"settings": {"teacher": spec.teacher, "student": spec.student,
                         "student_options": dict(spec.student_options),
                         "train_data": spec.train_data, "val_data": list(spec.val_data),
                         "seeds": list(spec.seeds), "common": common,
                         "lr_sizes": list(spec.lr_sizes),
                         "far_targets": list(spec.far_targets), "flip": spec.flip,
                         "folds": spec.folds, "alignment_data": spec.alignment_data,
                         "spread_rule": "|mean - mean_self| > std + std_self, std over seeds "
                                        "(ddof=1)"},
            "sets": sets, "supported_fars": supported, "teacher": teacher_entry,
            "methods": per_method, "rows": rows, "seconds": seconds}


# --- presentation -----------------------------------------------------------------------------

def _pm(stats: dict[str, Any] | None, scale: float = 100.0, digits: int = 2) -> str:
    if stats is None:
        return "—"
    if "non_finite" in stats:
        return f"non-finite ({stats['non_finite']} seeds)"
    if digits == 0 or scale != 1.0:
        return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"
    # NRMSE: a diverged landmark head gives 1e30-scale errors that fixed point would spell out
    return f"{stats['mean']:.{digits}g} ± {stats['std']:.{digits}g}"
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def _mark(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return ""
    return {"better": " ▲", "worse": " ▼"}.get(verdict["verdict"], "")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown_report(report: Mapping[str, Any]) -> str:
    """The report as markdown: the one table, the reading against the self-studied student,
    the commands that rerun each row alone, and the rows that could not run."""
    st = report["settings"]
    sizes = [str(s) for s in st["lr_sizes"]]
    common = st["common"]
    lines = ["# kdface comparison: every method, one teacher, one student, one protocol", ""]
    lines.append(f"Teacher: `{st['teacher']}`. Student: `{st['student']}` "
                 f"`{json.dumps(st['student_options'])}`. Training data: `{st['train_data']}`. "
                 f"Seeds: {', '.join(str(s) for s in st['seeds'])}.")
    budget = ", ".join(f"{k}={common[k]}" for k in ("steps", "batch_size", "learning_rate",
                                                    "schedule", "input_size", "student_view")
                       if k in common)
    lines.append(f"Same budget for every row: {budget or 'TrainConfig defaults'} (a row "
                 f"initialized from another row also carries that row's training).")
    lines.append(f"Cells: mean ± std over seeds (ddof 1) of the {st['folds']}-fold verification "
                 f"accuracy in %, computed by `kdface.evaluate` on each run; LR columns: probe "
                 f"degraded to N px (Wang et al. 2019 protocol). ▲/▼: beyond the seed spread "
                 f"against the self-studied student (|Δ| > std + std_self).")
    lines.append("")
    for set_name, info in report["sets"].items():
        fars = report["supported_fars"].get(set_name, [])
        far = min(fars) if fars else None
        head = ["method", "paper", "full res.", *[f"{s} px" for s in sizes]]
        if far is not None:
            head.append(f"TAR@FAR={far:g}")
        head += ["NRMSE", "params", "MACs", "train img/s", "added to the student"]
        lines += [f"## {set_name} ({info['num_pairs']} pairs)", "", _row(head),
                  "|" + "---|" * len(head)]
        teacher = report.get("teacher")
        if teacher and set_name in teacher["verification"]:
            tv = teacher["verification"][set_name]
            model = teacher.get("model") or {}
            cells = ["teacher (reference)", "—", f"{tv['hr'] * 100:.2f}",
                     *[f"{tv['lr'][s] * 100:.2f}" if s in tv["lr"] else "—" for s in sizes]]
            if far is not None:
                v = tv["tar_at_far"].get(f"{far:g}")
                cells.append("—" if v is None else f"{v * 100:.2f}")
            cells += ["—", _params(model), _macs(model), "—", ""]
            lines.append(_row(cells))
        for name, m in report["methods"].items():
            ver = m.get("verification", {}).get(set_name)
            if ver is None and "alignment_nrmse" in m:
                cells = [name, m.get("paper_label", m["paper"]), "alignment only",
                         *["" for _ in sizes]]
                cells += [""] if far is not None else []
                cells += [_pm(m["alignment_nrmse"], scale=1.0, digits=4),
                          _params(m.get("model") or {}), _macs(m.get("model") or {}),
                          _pm(m.get("train_images_per_s"), scale=1.0, digits=0), m["adds"]]
                lines.append(_row(cells))
                continue
            if ver is None:
                status = m["status"] + (f": {'; '.join(m['reasons'])}" if m["reasons"] else "")
                cells = [name, m.get("paper_label", m["paper"]), status, *["" for _ in sizes]]
                cells += [""] if far is not None else []
                cells += ["", "", "", "", m["adds"]]
                lines.append(_row(cells))
                continue
            vs = m.get("vs_self_studied", {}).get(set_name, {})
            cells = [name, m.get("paper_label", m["paper"]), _pm(ver["hr"]) + _mark(vs.get("hr")),
                     *[_pm(ver["lr"].get(s)) + _mark(vs.get("lr", {}).get(s)) for s in sizes]]
            if far is not None:
                cells.append(_pm(ver["tar_at_far"].get(f"{far:g}")))
            cells += [_pm(m.get("alignment_nrmse"), scale=1.0, digits=4),
                      _params(m.get("model") or {}), _macs(m.get("model") or {}),
                      _pm(m.get("train_images_per_s"), scale=1.0, digits=0), m["adds"]]
            if m["status"] != "done":
                cells[0] += f" ({m['status']}: {len(m['seeds'])} seeds)"
            lines.append(_row(cells))
        lines.append("")
        if not fars:
            lines.append(f"TAR@FAR: no FAR of {st['far_targets']} is supported by {set_name}'s "
                         f"smallest training split ({info['min_train_negatives']} negatives).")
        else:
            lines.append(f"TAR@FAR: the lowest FAR {set_name} supports ({info['num_negative']} "
                         f"negative pairs; every supported FAR in comparison.json).")
        lines.append("")
    lines += ["## Against the self-studied student", "",
              "Δ in accuracy points (method mean − self-studied mean) and the verdict by the "
              "spread rule above.", ""]
    head = ["method", "set", "full res.", *[f"{s} px" for s in sizes]]
    lines += [_row(head), "|" + "---|" * len(head)]
    for name, m in report["methods"].items():
        for set_name, vs in m.get("vs_self_studied", {}).items():
            lines.append(_row([name, set_name, _delta(vs["hr"]),
                               *[_delta(vs["lr"].get(s)) for s in sizes]]))
    lines += ["", "## Rows: paper, equation and the command that reruns each alone", ""]
    lines += [_row(["method", "paper", "equation / table row", "command (seed 0 shown; "
                    "--seed and --workdir change per seed)"]), "|---|---|---|---|"]
    for name, m in report["methods"].items():
        eq = m["equation"] + (f" Note: {m['note']}." if m["note"] else "")
        if m["init_from"]:
            eq += f" Initialized from row {m['init_from']} (same seed)."
        lines.append(_row([name, m["citation"], eq, f"`{m['command']}`"]))
    lines.append("")
    lines.append(f"Total time of this invocation: {report['seconds']:.0f} s "
                 f"(rows finished earlier are reused, not retrained).")
    return "\n".join(lines) + "\n"


def _delta(v: dict[str, Any] | None) -> str:
    if v is None:
        return "—"
    return f"{v['delta'] * 100:+.2f} ({v['verdict']})"


def _params(model: Mapping[str, Any]) -> str:
    return f"{model['params'] / 1e6:.3f} M" if model.get("params") is not None else "—"


def _macs(model: Mapping[str, Any]) -> str:
    return f"{model['macs'] / 1e6:.1f} M" if model.get("macs") is not None else "—"


TEACHER_SERIES = "teacher (reference)"  # the teacher's row label in the tables


def write_comparison(report: Mapping[str, Any], out_dir: str) -> list[str]:
    """``comparison.json``, ``comparison.md``, ``accuracy_<set>.png`` (per method, mean ± std
    at full resolution and at the smallest probe size) and ``accuracy_vs_probe_<set>.png``
    (each with a PDF and an SVG beside it)."""
    from kdface import metrics
    from kdface.evaluation import write_json_and_markdown
    written = write_json_and_markdown(out_dir, "comparison", report, markdown_report(report))
    sizes = [str(s) for s in report["settings"]["lr_sizes"]]
    for set_name, info in report["sets"].items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in set_name)
        bars = {}
        for name, m in report["methods"].items():
            ver = m.get("verification", {}).get(set_name)
            if ver is not None and ver["hr"] is not None:
                bars[name] = [ver["hr"]] + ([ver["lr"].get(sizes[0])] if sizes else [])
        if not bars:
            continue
        path = os.path.join(out_dir, f"accuracy_{safe}.png")
        labels = ["full resolution"] + ([f"{sizes[0]} px probe"] if sizes else [])
        figure = metrics.bar_figure(bars, labels, xlabel="verification accuracy",
                                    title=f"{set_name}: accuracy per method (mean ± std over "
                                          f"seeds)")
        written.extend(metrics.save_figure(figure, path))
        if sizes and info.get("image_size"):
            figure = probe_size_figure(report, set_name)
            written.extend(metrics.save_figure(
                figure, os.path.join(out_dir, f"accuracy_vs_probe_{safe}.png")))
    return written


def probe_size_figure(report: Mapping[str, Any], set_name: str):
    """The figure of ``accuracy_vs_probe_<set>.png``: mean accuracy over seeds of every method
    on ``set_name`` against the probe size (full resolution at the set's image size), the
    self-studied student and the teacher drawn as references in their own styles; one panel
    per paper family, the references in each, when more than 8 series would share one."""
    from kdface import metrics
    sizes = [str(s) for s in report["settings"]["lr_sizes"]]
    x = [int(s) for s in sizes] + [max(report["sets"][set_name]["image_size"])]
    series: dict[str, list[float | None]] = {}
    families: dict[str, list[str]] = {}
    for name, m in report["methods"].items():
        ver = m.get("verification", {}).get(set_name)
        if ver is None:
            continue
        series[name] = [_mean(ver["lr"].get(s)) for s in sizes] + [_mean(ver["hr"])]
        if name != BASELINE:
            label = m.get("paper_label", m["paper"])
            families.setdefault("no teacher" if label == "—" else label, []).append(name)
        if name == BASELINE:  # the teacher right after the reference student in the legend
            series.update(_teacher_series(report, set_name, sizes))
    if BASELINE not in series:
        series.update(_teacher_series(report, set_name, sizes))
    shared = [n for n in (BASELINE, TEACHER_SERIES) if n in series]
    # Styles by position in the comparison's method list, so a method keeps its colour,
    # marker and line style on every set's figure, whichever rows each set has.
    styles = metrics.series_styles(list(report["methods"]), reference_student=BASELINE,
                                  teacher=TEACHER_SERIES)
    return metrics.accuracy_vs_probe_size_figure(
        x, series, title=f"{set_name}: accuracy vs probe size (mean over seeds; rightmost: "
                         f"full resolution)", size=(1000, 700), log_x=True, styles=styles,
        panels=families, shared=shared)


def _teacher_series(report: Mapping[str, Any], set_name: str,
                    sizes: Sequence[str]) -> dict[str, list[float | None]]:
    teacher = (report.get("teacher") or {}).get("verification", {}).get(set_name)
    if teacher is None:
        return {}
    return {TEACHER_SERIES: [teacher["lr"].get(s) for s in sizes] + [teacher["hr"]]}


def _mean(stats: dict[str, Any] | None) -> float | None:
    return None if stats is None else stats["mean"]
