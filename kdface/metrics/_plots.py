"""Figures of the evaluation report, drawn with matplotlib: ROC, accuracy vs probe size, CED.

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure` (restyle it, or save it
in any format); each ``plot_*`` function draws the same figure and writes it three times: PNG
for a quick look, SVG for the web (text kept as text) and PDF for a paper. Figures are built on
their own Agg canvas, never through pyplot, so kdface neither switches the caller's matplotlib
backend nor leaves figures open in pyplot's registry.

Line figures are drawn to stay readable with ~20 series: every series has its own colour,
marker and line style (:func:`series_styles`), the legend sits outside the axes (the figure
grows to hold it), a reference student and a teacher have styles no method uses, and series
grouped into panels (one per paper family) are drawn as small multiples with shared axes when
one panel would hold more than ``max_per_panel`` of them.

ROC curves of several models share one figure per verification set (log-FPR axis, as TAR@FAR
tables read); accuracy vs probe size follows the LR protocol of Wang et al., Improved Knowledge
Distillation for Training Fast Low Resolution Face Recognition Model, ICCV Workshops 2019
(Table 4: LR-LFW at 8/12/16/20 px and at full size); the CED curve is the landmark alignment
error distribution.

References:
  Okabe, Ito, Color Universal Design (CUD): How to make figures and presentations that are
  friendly to colorblind people, 2008, https://jfly.uni-koeln.de/color/ ; Wong, Points of
  view: Color blindness, Nature Methods 8, 441 (2011), https://doi.org/10.1038/nmeth.1618 .
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

# Okabe-Ito: distinguishable with every common colour-vision deficiency (Okabe & Ito 2008,
# Wong 2011). Its yellow is last: the palest on white, so a short list of series never needs it.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
           "#000000")
# Series colours: the palette without black, which the reference student keeps for itself.
SERIES_COLORS = PALETTE[:7]
# Six markers: coprime with the seven colours, so series i and j share both only when
# i ≡ j (mod 42); filled shapes that stay distinct in greyscale and at 5 px.
SERIES_MARKERS = ("o", "s", "^", "D", "v", "P")
# Dashed ("--") is left to the reference student.
SERIES_LINESTYLES = ("-", "-.", ":")
_DISTINCT_PAIRS = len(SERIES_COLORS) * len(SERIES_MARKERS)              # 42
MAX_SERIES = _DISTINCT_PAIRS * len(SERIES_LINESTYLES)                   # 126
# TrueType fonts in the PDF: conference PDF checkers (IEEE PDF eXpress) reject matplotlib's
# default Type 3 fonts. SVG text stays text (searchable, selectable); a fixed hash salt keeps
# the SVG's element ids, and so the file, the same run to run.
_PDF_RC = {"pdf.fonttype": 42}
_SVG_RC = {"svg.fonttype": "none", "svg.hashsalt": "kdface"}


@dataclasses.dataclass(frozen=True)
class SeriesStyle:
    """How one series is drawn: matplotlib ``Line2D`` properties (see :meth:`kwargs`)."""
    color: str
    marker: str
    linestyle: str
    linewidth: float = 1.6
    markersize: float = 5.5
    zorder: float = 2.0

    def kwargs(self) -> dict[str, Any]:
        # A thin dark edge keeps the pale palette entries (yellow, sky blue) visible on white.
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle,
                "linewidth": self.linewidth, "markersize": self.markersize,
                "zorder": self.zorder, "markeredgecolor": "0.15", "markeredgewidth": 0.5}


# The reference rows: colours outside SERIES_COLORS and, for the student, the one dashed line.
REFERENCE_STUDENT_STYLE = SeriesStyle("#000000", "o", "--", linewidth=2.2, markersize=6.0,
                                      zorder=3.0)
# The teacher under the methods' lines (zorder 2) but over the grid (1.5).
TEACHER_STYLE = SeriesStyle("#8C8C8C", "*", "-", linewidth=3.6, markersize=10.0, zorder=1.8)


def series_styles(names: Sequence[str], *, reference_student: str | None = None,
                  teacher: str | None = None) -> dict[str, SeriesStyle]:
    """{name: style} for ``names`` in the order given (e.g. a comparison's method list).

    A series' style depends only on its position among the non-reference ``names``, so the
    same list gives the same style to a name in every figure, whichever subset each draws.
    Position i gets colour ``SERIES_COLORS[i % 7]``, marker ``SERIES_MARKERS[i % 6]`` and line
    style ``SERIES_LINESTYLES[(i // 7 + i // 42) % 3]``: no two of the first 42 share colour
    and marker, any 7 consecutive ones differ in colour and any 6 in marker, and up to
    ``MAX_SERIES`` (126) differ in colour, marker or line style. ``reference_student`` and
    ``teacher`` (names in ``names``, or extra) get ``REFERENCE_STUDENT_STYLE`` (black, dashed)
    and ``TEACHER_STYLE`` (thick grey, behind the others), which no other series uses.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"series names must be unique, got {names}")
    if reference_student is not None and reference_student == teacher:
        raise ValueError(f"reference_student and teacher must differ, both {teacher!r}")
    refs = {reference_student: REFERENCE_STUDENT_STYLE, teacher: TEACHER_STYLE}
    refs.pop(None, None)
    others = [n for n in names if n not in refs]
    if len(others) > MAX_SERIES:
        raise ValueError(f"{len(others)} series: at most {MAX_SERIES} have distinct styles")
    styles = {}
    for i, name in enumerate(others):
        styles[name] = SeriesStyle(
            SERIES_COLORS[i % len(SERIES_COLORS)], SERIES_MARKERS[i % len(SERIES_MARKERS)],
            SERIES_LINESTYLES[(i // len(SERIES_COLORS) + i // _DISTINCT_PAIRS)
                              % len(SERIES_LINESTYLES)])
    styles.update(refs)
    return {n: styles[n] for n in [*names, *[r for r in refs if r not in names]]}


def line_figure(series: Mapping[str, tuple[Any, Any]], *, title: str = "", xlabel: str = "",
                ylabel: str = "", xlim: tuple[float, float] | None = None,
                ylim: tuple[float, float] | None = None, log_x: bool = False,
                xticks: Sequence[float] | None = None, markers: bool = False,
                size: tuple[int, int] = (800, 600),
                styles: Mapping[str, SeriesStyle] | None = None,
                panels: Mapping[str, Sequence[str]] | None = None,
                shared: Sequence[str] = (), max_per_panel: int = 8) -> Figure:
    """``series`` {label: (x [n], y [n])} as lines, in legend order, legend outside the axes.

    size: (width, height) in pixels (at 100 dpi) of the figure (of each panel: 0.6 of it, when
    there are several) while the legend beside the plot fits in a quarter of that width and in
    its height; a larger legend makes the figure wider (the plot keeps 3/4 of the width) or
    taller, never the plot smaller. Non-finite points are dropped, and with
    ``log_x`` non-positive x too. Limits default to the data range; ``xticks`` puts the x
    ticks (labelled with their values) at those positions only. markers: a marker at every
    point; otherwise about ten per line, so a line is still told by its marker.
    styles: {label: SeriesStyle}, default ``series_styles(list(series))``.
    panels: {panel title: [labels]} (e.g. one per paper family); when ``series`` holds more
    than ``max_per_panel`` labels they are drawn as small multiples, one panel each, with
    ``shared`` (the references) repeated in every panel and the axes shared; otherwise every
    series is drawn on one panel. Labels of ``series`` in no panel and not shared get their own
    panel, titled "other".
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
    styles = dict(series_styles(list(series)) if styles is None else styles)
    missing = [label for label in series if label not in styles]
    if missing:
        raise ValueError(f"styles has no entry for {missing}")
    groups = _panel_groups(list(series), panels, shared, max_per_panel)

    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(width / 100, height / 100), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax in axes[len(groups):]:
        fig.delaxes(ax)
    legends = []
    for k, ((panel_title, labels), ax) in enumerate(zip(groups, axes)):
        for label in labels:
            x, y = data[label]
            ax.plot(x, y, label=label, markevery=None if markers or x.size <= 12 else 0.1,
                    **styles[label].kwargs())
        if log_x:
            ax.set_xscale("log")
        ax.grid(True, color="0.9")
        ax.set_title(panel_title if len(groups) > 1 else title)
        # The bottom panel of each column carries the x label and tick labels (a deleted slot
        # below would otherwise leave a column without them), the first column the y label.
        if k + ncols >= len(groups):
            ax.set_xlabel(xlabel)
            ax.xaxis.set_tick_params(labelbottom=True)
        if k % ncols == 0:
            ax.set_ylabel(ylabel)
        # Outside the axes, to their right: constrained layout makes room for it.
        legends.append(ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0),
                                 borderaxespad=0.0, fontsize="small", handlelength=3.0))
    first = axes[0]
    if xticks is not None:
        first.xaxis.set_major_locator(FixedLocator([float(t) for t in xticks]))
        first.xaxis.set_minor_locator(NullLocator())
        first.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if xlim is not None:
        first.set_xlim(*xlim)
    if ylim is not None:
        first.set_ylim(*ylim)
    if len(groups) > 1 and title:
        fig.suptitle(title)
    # Grow the figure so each legend fits beside its panel: legend sizes depend on the text
    # only, not on where the layout puts them.
    renderer = fig.canvas.get_renderer()
    extents = [legend.get_window_extent(renderer) for legend in legends]
    # A panel keeps its share of ``size`` while its legend takes at most a quarter of the
    # width; a wider legend widens the figure (the plot keeps 3/4), a taller one heightens it.
    legend_w = max(e.width for e in extents) + 30
    scale = 1.0 if len(groups) == 1 else 0.6  # a panel of small multiples: 0.6 of ``size``
    panel_w = max(width * scale, 0.75 * width * scale + legend_w)
    panel_h = max(height * scale, max(e.height for e in extents) + 70)
    suptitle_h = 40 if len(groups) > 1 and title else 0
    fig.set_size_inches(math.ceil(ncols * panel_w) / 100,
                        math.ceil(nrows * panel_h + suptitle_h) / 100)
    return fig


def _panel_groups(labels: list[str], panels: Mapping[str, Sequence[str]] | None,
                  shared: Sequence[str], max_per_panel: int) -> list[tuple[str, list[str]]]:
    """[(panel title, labels drawn in it)], in ``labels`` order within each panel."""
    unknown = sorted(set(shared) - set(labels))
    if unknown:
        raise ValueError(f"shared names series that are not drawn: {unknown}")
    if panels is None or len(labels) <= max_per_panel:
        return [("", labels)]
    placed: dict[str, str] = {}
    for panel_title, members in panels.items():
        for label in members:
            if label not in labels:
                raise ValueError(f"panel {panel_title!r} names {label!r}, which is not a series")
            if label in placed or label in shared:
                raise ValueError(f"{label!r} is in more than one panel (or also shared)")
            placed[label] = panel_title
    rest = [label for label in labels if label not in placed and label not in shared]
    titles = [t for t in panels if any(placed.get(label) == t for label in labels)]
    groups = [(t, [label for label in labels if label in shared or placed.get(label) == t])
              for t in titles]
    if rest:
        groups.append(("other", [label for label in labels if label in shared or label in rest]))
    return groups or [("", labels)]


def save_figure(fig: Figure, path: str | os.PathLike) -> list[str]:
    """Writes ``fig`` to ``path`` (.png) and next to it as .pdf and .svg; returns the three
    paths (PNG, PDF, SVG)."""
    png = os.fspath(path)
    if not png.lower().endswith(".png"):
        raise ValueError(f"path must end with .png (the PDF and SVG are written next to it), "
                         f"got {png!r}")
    pdf, svg = png[:-4] + ".pdf", png[:-4] + ".svg"
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=fig.dpi)
    title = fig.get_suptitle() or next((ax.get_title() for ax in fig.axes if ax.get_title()), "")
    # rc_context restores the caller's settings on exit: nothing global changes.
    with matplotlib.rc_context(_PDF_RC):
        fig.savefig(pdf, metadata={"Title": title, "Creator": "kdface"})
    with matplotlib.rc_context(_SVG_RC):
        fig.savefig(svg, metadata={"Title": title, "Creator": "kdface", "Date": None})
    return [png, pdf, svg]


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
    # Outside the axes: a bar reaching the right edge is never hidden behind it.
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def line_plot(path: str | os.PathLike, series: Mapping[str, tuple[Any, Any]],
              **options: Any) -> list[str]:
    """:func:`line_figure` written to ``path`` (.png), its .pdf and .svg; returns the paths."""
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
    """:func:`roc_figure` written to ``path`` (.png), its .pdf and .svg; returns the paths."""
    return save_figure(roc_figure(rocs, **options), path)


def accuracy_vs_probe_size_figure(
        probe_sizes: Sequence[float], accuracies: Mapping[str, Sequence[float | None]], *,
        full_resolution: Mapping[str, tuple[float, float]] | None = None,
        title: str = "Accuracy vs probe size", ylabel: str = "Verification accuracy",
        size: tuple[int, int] = (800, 600), log_x: bool = False, **layout: Any) -> Figure:
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
    ticks = sorted({float(v) for x, _ in series.values() for v in x}) if log_x else None
    return line_figure(series, title=title, xlabel="Probe size (px)", ylabel=ylabel,
                       markers=True, size=size, log_x=log_x, xticks=ticks, **layout)


def plot_accuracy_vs_probe_size(path: str | os.PathLike, probe_sizes: Sequence[float],
                                accuracies: Mapping[str, Sequence[float | None]],
                                **options: Any) -> list[str]:
    """:func:`accuracy_vs_probe_size_figure` written to ``path`` (.png), its .pdf and .svg."""
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
    """:func:`ced_figure` written to ``path`` (.png), its .pdf and .svg; returns the paths."""
    return save_figure(ced_figure(ceds, **options), path)
