"""Side-by-side comparison of runs: ``compare`` loops runs x evaluators (the protocol objects
of ``kdface.evaluation._evaluators``), ``markdown_table`` joins the evaluators' sections and
``write_report`` writes them with the plots. The report layout is documented in
:mod:`kdface.evaluate`."""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdface.evaluation._embedder import Embedder, EmbeddingFile
from kdface.evaluation._evaluator import Evaluator
from kdface.evaluation._evaluators import EVALUATORS
from kdface.evaluation._imported import TeacherEmbedder


def open_run(spec: Any, *, batch_size: int = 128) -> Embedder | EmbeddingFile:
    """A run from a training workdir (:class:`Embedder`), a third-party teacher file
    ``pth:[ARCH:]PATH`` / ``onnx:[ARCH:]PATH`` (:class:`TeacherEmbedder`, an Embedder), an
    ``.npz`` of exported embeddings (:class:`EmbeddingFile`), or either object as is."""
    from kdface.interop import is_imported_teacher
    if isinstance(spec, (Embedder, EmbeddingFile)):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"a run must be a workdir, a pth:/onnx: teacher file, an .npz path, an "
                        f"Embedder or an EmbeddingFile, got {type(spec).__name__}")
    if is_imported_teacher(os.fspath(spec)):
        return TeacherEmbedder(os.fspath(spec), batch_size=batch_size)
    if os.fspath(spec).endswith(".npz"):
        return EmbeddingFile(spec)
    return Embedder(spec, batch_size=batch_size)


def compare(runs: Mapping[str, Any], evaluators: Sequence[Evaluator], *,
            out_dir: str | None = None, batch_size: int = 128) -> dict[str, Any]:
    """Evaluates every run with every evaluator; writes the report to ``out_dir``.

    runs: ``{name: workdir | pth:/onnx: teacher | .npz path | Embedder | EmbeddingFile}``
    (:func:`open_run`, forward passes of ``batch_size`` images). evaluators: protocol objects
    (:class:`Verification`, :class:`Identification`, :class:`IjbVerification`,
    :class:`Alignment`, :class:`ModelFacts`), in the order of the report's sections.

    Returns the report dict (also ``report.json``): the evaluators' report fields, ``runs``
    (per run its kind and source, each evaluator's result, ``notes``, ``seconds``) and
    ``seconds``; with ``out_dir`` also ``report.md`` (:func:`markdown_table`) and the
    evaluators' plots (:func:`write_report`).
    """
    t_start = time.perf_counter()
    if not runs:
        raise ValueError("no runs to compare")
    if not evaluators:
        raise ValueError("nothing to evaluate: give at least one evaluator")
    opened = {name: open_run(spec, batch_size=batch_size) for name, spec in runs.items()}
    report: dict[str, Any] = {}
    for evaluator in evaluators:
        for key, value in evaluator.report_fields().items():
            if isinstance(value, Mapping) and key in report:
                report[key].update(value)
            else:
                report[key] = dict(value) if isinstance(value, Mapping) else value
    report["runs"] = {}
    curves: list[dict[str, Any]] = [{} for _ in evaluators]
    for run_name, run in opened.items():
        t_run = time.perf_counter()
        entry: dict[str, Any] = {"notes": [], **run.describe()}
        for evaluator, plot in zip(evaluators, curves):
            result = dict(evaluator.evaluate(run))
            entry["notes"] += result.pop("notes", [])
            if "plot" in result:
                plot[run_name] = result.pop("plot")
            entry.update(result)
        entry["seconds"] = time.perf_counter() - t_run
        report["runs"][run_name] = entry
    report["seconds"] = time.perf_counter() - t_start
    if out_dir:
        write_report(report, out_dir, evaluators, curves=curves)
    return report


def write_json_and_markdown(out_dir: str, stem: str, report: Mapping[str, Any],
                            markdown: str) -> list[str]:
    """Writes ``<stem>.json`` (strict JSON: NaN/inf refused, see :func:`to_jsonable`) and
    ``<stem>.md`` in ``out_dir`` (created); returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")]
    with open(written[0], "w") as f:
        json.dump(to_jsonable(report), f, indent=1, allow_nan=False)
    with open(written[1], "w") as f:
        f.write(markdown)
    return written


def write_report(report: Mapping[str, Any], out_dir: str,
                 evaluators: Sequence[Evaluator | type[Evaluator]] = EVALUATORS, *,
                 curves: Sequence[Mapping[str, Any]] | None = None) -> list[str]:
    """Writes ``report.json``, ``report.md`` and each evaluator's plots (``curves``: per
    evaluator ``{run: plot data}``, as :func:`compare` collects them; without them only the
    plots the report itself holds, such as accuracy vs probe size); returns the paths."""
    written = write_json_and_markdown(out_dir, "report", report,
                                      markdown_table(report, evaluators))
    for evaluator, plot in zip(evaluators, curves or [{}] * len(evaluators)):
        written += evaluator.plots(report, plot, out_dir)
    return written


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: arrays -> lists, float keys -> ``'%g'`` strings, NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {(f"{k:g}" if isinstance(k, float) else str(k)): to_jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def markdown_table(report: Mapping[str, Any],
                   evaluators: Sequence[Evaluator | type[Evaluator]] = EVALUATORS) -> str:
    """The report as markdown: each evaluator's sections in order (by default every
    protocol's: verification accuracy with one column per LR probe size, TAR@FAR with the
    unsupported FARs explained, identification, IJB, alignment, model facts), then the notes."""
    lines = ["# kdface evaluation report", ""]
    for evaluator in evaluators:
        lines += evaluator.markdown(report)
    notes = [f"- {run_name}: {n}" for run_name, entry in report["runs"].items()
             for n in entry.get("notes", [])]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)
