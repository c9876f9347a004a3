"""Figures of the evaluation report, drawn with matplotlib: ROC, accuracy vs probe size, CED.

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure` (restyle it, or save it
in any format); each ``plot_*`` function draws the same figure and writes it twice, as a PNG
for a quick look and as a PDF for a paper. Figures are built on their own Agg canvas, never
through pyplot, so kdface neither switches the caller's matplotlib backend nor leaves figures
open in pyplot's registry.

ROC curves of several models share one figure per verification set (log-FPR axis, as TAR@FAR
tables read); accuracy vs probe size follows the LR protocol of Wang et al., Improved Knowledge
Distillation for Training Fast Low Resolution Face Recognition Model, ICCV Workshops 2019
(Table 4: LR-LFW at 8/12/16/20 px and at full size); the CED curve is the landmark alignment
error distribution.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Okabe-Ito: distinguishable with every common colour-vision deficiency and in greyscale print.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442", "#E69F00",
           "#000000")
# TrueType fonts in the PDF: conference PDF checkers (IEEE PDF eXpress) reject matplotlib's
# default Type 3 fonts.
_PDF_RC = {"pdf.fonttype": 42}


def line_figure(series: Mapping[str, tuple[Any, Any]], *, title: str = "", xlabel: str = "",
                ylabel: str = "", xlim: tuple[float, float] | None = None,
                ylim: tuple[float, float] | None = None, log_x: bool = False,
                markers: bool = False, size: tuple[int, int] = (800, 600)) -> Figure:
    """``series`` {label: (x [n], y [n])} as lines on one axes, in legend order.

    size: (width, height) of the PNG in pixels (at 100 dpi). Non-finite points are dropped, and
    with ``log_x`` non-positive x too; a series left with a single point is drawn as a marker.
    Limits default to the data range.
    """
    if not series:
        raise ValueError("series must hold at least one {label: (x, y)} entry")
    width, height = size
    if width < 200 or height < 150:
        raise ValueError(f"size must be at least (200, 150) pixels, got {size}")
    data = {}
    for label, (x, y) in series.items():
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"series {label!r}: x and y lengths differ ({x.size} vs {y.size})")
        keep = np.isfinite(x) & np.isfinite(y) & ((x > 0) if log_x else True)
        data[label] = (x[keep], y[keep])
    if not any(x.size for x, _ in data.values()):
        raise ValueError("no finite points to plot")

    fig = Figure(figsize=(width / 100, height / 100), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, (x, y)) in enumerate(data.items()):
        ax.plot(x, y, color=PALETTE[i % len(PALETTE)], linewidth=1.8, label=label,
                marker="o" if markers or x.size == 1 else None, markersize=5)
    if log_x:
        ax.set_xscale("log")
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="0.9")
    ax.legend(loc="best")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> list[str]:
    """Writes ``fig`` to ``path`` (.png) and next to it as .pdf; returns both paths."""
    png = os.fspath(path)
    if not png.lower().endswith(".png"):
        raise ValueError(f"path must end with .png (the PDF is written next to it), got {png!r}")
    pdf = png[:-4] + ".pdf"
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=fig.dpi)
    # rc_context restores the caller's settings on exit: nothing global changes.
    with matplotlib.rc_context(_PDF_RC):
        title = fig.axes[0].get_title() if fig.axes else ""
        fig.savefig(pdf, metadata={"Title": title, "Creator": "kdface"})
    return [png, pdf]


def bar_figure(bars: Mapping[str, Sequence[Mapping[str, float] | None]],
               labels: Sequence[str], *, title: str = "", xlabel: str = "",
               size: tuple[int, int] = (900, 600)) -> Figure:
    """Horizontal bars with ±std whiskers: one group per entry of ``bars`` ({name: [stats or
    None per label]}, stats ``{'mean', 'std'}``), one bar per ``labels`` entry."""
    if not bars or not labels:
        raise ValueError("bars and labels must not be empty")
    for name, values in bars.items():
        if len(values) != len(labels):
            raise ValueError(f"{name!r}: {len(values)} values for {len(labels)} labels")
    width, height = size
    fig = Figure(figsize=(width / 100, max(height, 60 + 18 * len(bars) * len(labels)) / 100),
                 dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = list(bars)[::-1]  # first entry on top
    bar = 0.8 / len(labels)
    for k, label in enumerate(labels):
        ys, means, stds = [], [], []
        for i, name in enumerate(names):
            stats = bars[name][k]
            if stats is None or not np.isfinite(stats.get("mean", np.nan)):
                continue
            ys.append(i + 0.4 - (k + 0.5) * bar)
            means.append(stats["mean"])
            stds.append(stats.get("std") or 0.0)
        ax.barh(ys, means, height=bar * 0.9, xerr=stds, color=PALETTE[k % len(PALETTE)],
                label=label, error_kw={"elinewidth": 1, "capsize": 2})
    ax.set_yticks(range(len(names)), names)
    finite = [s["mean"] - (s.get("std") or 0) for v in bars.values() for s in v
              if s is not None and np.isfinite(s.get("mean", np.nan))]
    if finite:
        ax.set_xlim(max(0.0, min(finite) - 0.05), None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(True, axis="x", color="0.9")
    ax.legend(loc="lower right")
    return fig


def line_plot(path: str | os.PathLike, series: Mapping[str, tuple[Any, Any]],
              **options: Any) -> list[str]:
    """:func:`line_figure` written to ``path`` (.png) and its .pdf; returns both paths."""
    return save_figure(line_figure(series, **options), path)


def roc_figure(rocs: Mapping[str, Mapping[str, Any]], *, title: str = "ROC",
               log_fpr: bool = True, min_fpr: float | None = None,
               size: tuple[int, int] = (800, 600)) -> Figure:
    """ROC curves of several models on one figure: ``rocs`` {model: {'fpr': [n], 'tpr': [n]}}.

    Takes the ``roc`` entry of :func:`kdface.metrics.verification`. On the log axis the FPR range
    starts at ``min_fpr`` (default: the decade below the smallest positive FPR).
    """
    series = {name: (r["fpr"], r["tpr"]) for name, r in rocs.items()}
    xlim = None
    if log_fpr:
        positive = np.concatenate([np.asarray(r["fpr"], np.float64).ravel()
                                   for r in rocs.values()])
        positive = positive[positive > 0]
        lo = min_fpr or (10.0 ** math.floor(math.log10(positive.min())) if positive.size else 1e-6)
        xlim = (lo, 1.0)
    return line_figure(series, title=title, xlabel="False accept rate",
                       ylabel="True accept rate", xlim=xlim, ylim=(0.0, 1.0), log_x=log_fpr,
                       size=size)


def plot_roc(path: str | os.PathLike, rocs: Mapping[str, Mapping[str, Any]],
             **options: Any) -> list[str]:
    """:func:`roc_figure` written to ``path`` (.png) and its .pdf; returns both paths."""
    return save_figure(roc_figure(rocs, **options), path)


def accuracy_vs_probe_size_figure(
        probe_sizes: Sequence[float], accuracies: Mapping[str, Sequence[float | None]], *,
        full_resolution: Mapping[str, tuple[float, float]] | None = None,
        title: str = "Accuracy vs probe size", ylabel: str = "Verification accuracy",
        size: tuple[int, int] = (800, 600)) -> Figure:
    """Accuracy of several models against probe resolution (Wang et al. 2019, Table 4).

    probe_sizes: [S] side lengths in pixels the probes were reduced to (e.g. 8, 12, 16, 20);
    accuracies: {model: [S]} in the same order (None/NaN where a model was not run).
    full_resolution: {model: (input_size, accuracy)}, the unreduced probes' accuracy, drawn at
    the side length the network sees them at: its input size (48 for a 48x48 model even when
    the set's images are 112x112), which may differ between models.
    """
    sizes = np.asarray(probe_sizes, np.float64)
    full_resolution = full_resolution or {}
    unknown = set(full_resolution) - set(accuracies)
    if unknown:
        raise ValueError(f"full_resolution names models without accuracies: {sorted(unknown)}")
    series = {}
    for name, acc in accuracies.items():
        acc = np.asarray([np.nan if a is None else a for a in acc], np.float64)
        if acc.shape != sizes.shape:
            raise ValueError(f"{name!r}: {acc.size} accuracies for {sizes.size} probe sizes")
        x, y = sizes, acc
        if name in full_resolution:
            side, full = full_resolution[name]
            if not side > 0:
                raise ValueError(f"{name!r}: full-resolution input size must be positive, "
                                 f"got {side}")
            x = np.append(x, float(side))
            y = np.append(y, np.nan if full is None else float(full))
        series[name] = (x, y)
    return line_figure(series, title=title, xlabel="Probe size (px)", ylabel=ylabel,
                       markers=True, size=size)


def plot_accuracy_vs_probe_size(path: str | os.PathLike, probe_sizes: Sequence[float],
                                accuracies: Mapping[str, Sequence[float | None]],
                                **options: Any) -> list[str]:
    """:func:`accuracy_vs_probe_size_figure` written to ``path`` (.png) and its .pdf."""
    return save_figure(accuracy_vs_probe_size_figure(probe_sizes, accuracies, **options), path)


def ced_figure(ceds: Mapping[str, Mapping[str, Any]], *,
               title: str = "Cumulative error distribution",
               size: tuple[int, int] = (800, 600)) -> Figure:
    """CED curves {model: nrmse_dataset(...)['ced']} on one figure."""
    series = {name: (c["errors"], c["fraction"]) for name, c in ceds.items()}
    return line_figure(series, title=title, xlabel="NRMSE", ylabel="Fraction of images",
                       ylim=(0.0, 1.0), size=size)


def plot_ced(path: str | os.PathLike, ceds: Mapping[str, Mapping[str, Any]],
             **options: Any) -> list[str]:
    """:func:`ced_figure` written to ``path`` (.png) and its .pdf; returns both paths."""
    return save_figure(ced_figure(ceds, **options), path)
