"""The interface of an evaluation protocol object (:class:`Evaluator`) and the pieces its
renderers share: cells, markdown tables, ROC figures."""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from kdface import metrics
from kdface.evaluation._embedder import Embedder, EmbeddingFile

Run = Embedder | EmbeddingFile


class Evaluator(Protocol):
    """One evaluation protocol.

    ``report_fields()``: the report-level entries it adds (its settings, its data's summary);
    a mapping value is merged into an entry of the same name (``protocol``).
    ``evaluate(run)``: the run's result as entries of the run's report (``verification``,
    ``model``, ...), plus two reserved keys: ``notes`` (lines for the report's notes) and
    ``plot`` (curves for :meth:`plots`, left out of ``report.json``).
    ``markdown(report)``: its sections as markdown lines. ``plots(report, curves, out_dir)``:
    writes its figures (``curves``: ``{run: plot}``) and returns the paths written.
    """

    def report_fields(self) -> dict[str, Any]:
        return {}

    def evaluate(self, run: Run) -> dict[str, Any]:
        ...

    @staticmethod
    def markdown(report: Mapping[str, Any]) -> list[str]:
        return []

    @staticmethod
    def plots(report: Mapping[str, Any], curves: Mapping[str, Any], out_dir: str) -> list[str]:
        return []


def pick(result: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The entries of ``result`` a report keeps (``keys`` present in it, in that order)."""
    return {k: result[k] for k in keys if k in result}


def keyed(mapping: Mapping[Any, Any], key: float | int) -> Any:
    """A FAR/FPR-keyed value from a live report (float keys) or a parsed one (string keys)."""
    if key in mapping:
        return mapping[key]
    return mapping.get(f"{key:g}")


def cell(value: Any, digits: int = 4) -> str:
    """A number as a table cell; None and non-finite values as a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def far_label(f: float) -> str:
    """A rate as a column label: ``1e-3``."""
    return f"{f:.0e}".replace("e-0", "e-")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(head: Sequence[str], rows: list[list[str]]) -> list[str]:
    """A markdown table: the header, its rule and one line per row."""
    return [_row(head), "|" + "---|" * len(head), *[_row(r) for r in rows]]


def file_part(name: str) -> str:
    """``name`` as a piece of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def roc_plots(curves: Mapping[str, Mapping[str, Any]], out_dir: str) -> list[str]:
    """``roc_<set>.png`` per set, every run with finite curves on one figure; ``curves``:
    ``{run: {set: {"fpr", "tpr"}}}``."""
    by_set: dict[str, dict[str, Any]] = {}
    for run_name, per_set in curves.items():
        for set_name, curve in per_set.items():
            by_set.setdefault(set_name, {})[run_name] = curve
    written: list[str] = []
    for set_name, runs in by_set.items():
        finite = {r: c for r, c in runs.items()
                  if np.all(np.isfinite(c["fpr"])) and np.all(np.isfinite(c["tpr"]))}
        if finite:
            path = os.path.join(out_dir, f"roc_{file_part(set_name)}.png")
            written += metrics.plot_roc(path, finite, title=f"ROC on {set_name}")
    return written
