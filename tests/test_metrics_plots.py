"""Tests for the matplotlib figures: PNG + PDF + SVG written and readable, data where it
belongs, and readable with 20 series (distinct colour and marker per series, legends outside the
axes, the reference rows in their own style, small multiples per family).

The PNG is decoded with OpenCV, the PDF read as PDF (header, end marker, TrueType fonts, and
the text of its content streams decoded the way a PDF reader does: Flate-compressed streams,
string operands of TJ/Tj shown in the embedded font's two-byte codes), the SVG parsed as XML
(its text kept as <text> elements).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
import zlib

import cv2
import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_hex

from kdface import metrics
from kdface.metrics import _plots

from _figure_checks import (assert_distinct_colour_and_marker, assert_legends_outside_the_axes,
                            assert_reference_styles, line_styles)


def _pdf_text(data: bytes) -> str:
    """Concatenated text shown by the PDF's content streams (two-byte CID strings; a label
    with ligatures such as "fl" would show as one glyph code, so the labels here have none)."""
    unescape = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f"}
    shown = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            content = zlib.decompress(stream)
        except zlib.error:
            continue
        for operand in re.findall(rb"(\[.*?\]|\((?:\\.|[^\\)])*\))\s*T[Jj]", content, re.S):
            for raw in re.findall(rb"\(((?:\\.|[^\\)])*)\)", operand, re.S):
                raw = re.sub(rb"\\(.)", lambda m: unescape.get(m.group(1), m.group(1)), raw,
                             flags=re.S)
                shown.append(raw.decode("utf-16-be"))
            shown.append("\n")
    return "".join(shown)


def _svg_text(path) -> str:
    """The text of the SVG's <text> elements (matplotlib writes them with svg.fonttype none)."""
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return "\n".join("".join(el.itertext()) for el in root.iter("{http://www.w3.org/2000/svg}text"))


def _written(paths, size):
    """PNG, PDF and SVG written; the PNG at least ``size`` (larger where the legend needs)."""
    png, pdf, svg = paths
    assert png.endswith(".png") and pdf == png[:-4] + ".pdf" and svg == png[:-4] + ".svg"
    image = cv2.imread(png)
    assert image is not None and image.shape[2] == 3
    assert image.shape[0] >= size[1] and image.shape[1] >= size[0]
    data = open(pdf, "rb").read()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert b"/FontFile2" in data and b"/Type3" not in data  # TrueType embedded, no Type 3
    text = _pdf_text(data)
    svg_text = _svg_text(svg)
    for word in re.findall(r"\w+", text):
        assert word in svg_text, word  # the SVG shows the text the PDF shows
    return image, text


def test_line_plot_writes_png_pdf_and_svg_with_its_labels(tmp_path):
    paths = metrics.line_plot(tmp_path / "sub" / "line.png",
                              {"identity": ([0.0, 1.0], [0.0, 1.0]),
                               "level (ref)": ([0, 1], [1, 1])},
                              title="Line title", xlabel="the x axis", ylabel="the y axis",
                              size=(640, 480))
    image, text = _written(paths, (640, 480))
    for label in ("Line title", "the x axis", "the y axis", "identity", "level (ref)"):
        assert label in text, label
    # the first series' colour (Okabe-Ito blue, BGR here) is drawn in the PNG
    blue = np.array([0xB2, 0x72, 0x00])
    # Not rounding: antialiased uint8 line pixels blend with the white background; within
    # 40 of 255 per channel is "that colour drawn", no other series comes that close to it.
    assert np.any(np.all(np.abs(image.astype(int) - blue) <= 40, axis=-1))


def test_line_figure_holds_the_finite_data(tmp_path):
    fig = metrics.line_figure({"a": ([1e-3, 0.0, 0.1, np.nan], [0.2, 0.3, 0.4, 0.5])},
                              log_x=True)
    (line,) = fig.axes[0].get_lines()
    # non-positive x on a log axis and NaN are dropped, the rest kept in order
    np.testing.assert_array_equal(line.get_xdata(), [1e-3, 0.1])
    np.testing.assert_array_equal(line.get_ydata(), [0.2, 0.4])
    assert fig.axes[0].get_xscale() == "log"


def test_plot_roc_of_verification_results(tmp_path):
    rng = np.random.default_rng(0)
    same = np.arange(400) % 2 == 0
    e1 = rng.normal(size=(400, 8))
    rocs = {}
    for name, strength in [("teacher", 2.0), ("student", 0.7)]:
        e2 = np.where(same[:, None], strength, 0.0) * e1 + rng.normal(size=(400, 8))
        rocs[name] = metrics.verification(e1, e2, same, far_targets=())["roc"]
    fig = metrics.roc_figure(rocs, title="LFW")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["teacher", "student"]
    smallest = min(f[f > 0].min() for f in (np.asarray(r["fpr"]) for r in rocs.values()))
    # exact: kdface sets the limit by the same float64 operations on the same smallest FPR
    assert ax.get_xlim() == (10.0 ** np.floor(np.log10(smallest)), 1.0)
    _, text = _written(metrics.plot_roc(tmp_path / "roc.png", rocs, title="LFW",
                                        size=(640, 480)), (640, 480))
    assert "LFW" in text and "False accept rate" in text and "student" in text


def test_full_resolution_point_sits_at_the_input_size(tmp_path):
    probe = [8, 12, 16, 20]
    accs = {"S_KDim": [0.85, 0.93, 0.96, 0.97], "T": [None, None, None, None]}
    full = {"S_KDim": (48, 0.98), "T": (112, 0.99)}
    fig = metrics.accuracy_vs_probe_size_figure(probe, accs, full_resolution=full)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    np.testing.assert_array_equal(lines["S_KDim"].get_xdata(), [8, 12, 16, 20, 48])
    np.testing.assert_array_equal(lines["S_KDim"].get_ydata(), [0.85, 0.93, 0.96, 0.97, 0.98])
    # a model run only at full size is one marker at its own input size
    np.testing.assert_array_equal(lines["T"].get_xdata(), [112])
    np.testing.assert_array_equal(lines["T"].get_ydata(), [0.99])
    # without a full-resolution entry only the probe sizes are drawn
    fig = metrics.accuracy_vs_probe_size_figure(probe, {"S": [0.1, 0.2, 0.3, 0.4]})
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_xdata(), probe)
    _, text = _written(metrics.plot_accuracy_vs_probe_size(
        tmp_path / "lr.png", probe, accs, full_resolution=full, size=(700, 500)), (700, 500))
    assert "Probe size (px)" in text and "S_KDim" in text


def test_plot_ced(tmp_path):
    target = np.random.default_rng(1).uniform(0, 100, size=(20, 5, 2))
    r = metrics.nrmse_dataset(target + 1.0, target)
    fig = metrics.ced_figure({"model": r["ced"]})
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_xdata(), r["ced"]["errors"])
    _written(metrics.plot_ced(tmp_path / "ced.png", {"model": r["ced"]}), (800, 600))


def test_plots_leave_matplotlib_state_alone(tmp_path):
    backend = matplotlib.get_backend()
    fonttype = matplotlib.rcParams["pdf.fonttype"]
    metrics.line_plot(tmp_path / "a.png", {"a": ([0, 1], [0, 1])})
    assert matplotlib.get_backend() == backend
    assert matplotlib.rcParams["pdf.fonttype"] == fonttype


def test_plot_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=".png"):
        metrics.line_plot(tmp_path / "a.jpg", {"a": ([0, 1], [0, 1])})
    with pytest.raises(ValueError, match="lengths differ"):
        metrics.line_figure({"a": ([0, 1, 2], [0, 1])})
    with pytest.raises(ValueError, match="at least one"):
        metrics.line_figure({})
    with pytest.raises(ValueError, match="no finite points"):
        metrics.line_figure({"a": ([np.nan], [1.0])})
    with pytest.raises(ValueError, match="3 accuracies for 2 probe sizes"):
        metrics.accuracy_vs_probe_size_figure([8, 16], {"m": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="without accuracies"):
        metrics.accuracy_vs_probe_size_figure([8], {"m": [0.1]}, full_resolution={"x": (48, 1)})


# --- readable with many series ---------------------------------------------------------------

STUDENT, TEACHER = "self_studied", "teacher (reference)"


def _comparison_like(n):
    """``n`` methods in families of up to 6 (as a comparison's paper families are), the
    reference student first in the method list and the teacher beside it: accuracies at
    8/12/16/20 px and full resolution at 112 px."""
    rng = np.random.default_rng(n)
    methods = [STUDENT] + [f"m{i:02d}" for i in range(n)]
    accs = {name: list(rng.uniform(0.5, 0.99, 4)) for name in (*methods, TEACHER)}
    full = {name: (112, float(rng.uniform(0.9, 1.0))) for name in accs}
    sizes = [3, 6, 2, 4, 5]  # family sizes, cycled
    families, start, k = {}, 0, 0
    while start < n:
        families[f"family {k}"] = methods[1 + start:1 + start + sizes[k % len(sizes)]]
        start += sizes[k % len(sizes)]
        k += 1
    styles = _plots.series_styles(methods, reference_student=STUDENT, teacher=TEACHER)
    fig = metrics.accuracy_vs_probe_size_figure(
        [8, 12, 16, 20], accs, full_resolution=full, log_x=True, styles=styles,
        panels=families, shared=[STUDENT, TEACHER], title="synthetic", size=(1000, 700))
    return fig, families


@pytest.mark.parametrize("n", [2, 20])  # 3 and 21 series with the teacher (22 with the student)
def test_many_series_are_told_apart_and_the_legend_stays_off_the_data(n, tmp_path):
    fig, families = _comparison_like(n)
    assert_distinct_colour_and_marker(fig)
    assert_legends_outside_the_axes(fig)
    assert_reference_styles(fig, STUDENT, TEACHER)
    panels = [ax for ax in fig.axes if ax.get_lines()]
    if n + 2 > 8:
        # small multiples: one panel per family, each with the references, axes shared
        assert len(fig.axes) == len(panels) == len(families)
        assert [ax.get_title() for ax in panels] == list(families)
        for ax, members in zip(panels, families.values()):
            assert [line.get_label() for line in ax.get_lines()] == [STUDENT, *members, TEACHER]
            assert ax.get_shared_x_axes().joined(ax, panels[0])
            assert ax.get_shared_y_axes().joined(ax, panels[0])
        assert fig.get_suptitle() == "synthetic"
    else:
        (ax,) = fig.axes
        assert len(ax.get_lines()) == n + 2 and ax.get_title() == "synthetic"
    # every legend lists exactly its panel's lines
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == \
            [line.get_label() for line in ax.get_lines()]
    # the log axis is ticked at the probe sizes and the full-resolution size
    np.testing.assert_array_equal(fig.axes[0].get_xticks(), [8, 12, 16, 20, 112])
    paths = metrics.save_figure(fig, tmp_path / "many.png")
    image, text = _written(paths, (600, 420))
    # the saved PNG has the figure's own pixel size: the legend widened it, nothing cropped it
    w, h = fig.get_size_inches() * fig.dpi
    # (Agg truncates a fractional pixel size; kdface asks for whole pixels)
    assert abs(image.shape[0] - h) < 1 and abs(image.shape[1] - w) < 1
    assert "m00" in text and STUDENT in text and TEACHER in text


def test_figure_grows_with_the_legend():
    small, _ = _comparison_like(2)
    few = metrics.line_figure({"a": ([0, 1], [0, 1]), "b": ([0, 1], [1, 0])}, size=(640, 480))
    assert tuple(few.get_size_inches() * few.dpi) == (640, 480)  # a small legend fits
    many = metrics.line_figure({f"method with a long name {i}": ([0, 1], [i, i + 1])
                                for i in range(20)}, size=(800, 300))
    # 20 legend entries (one panel: no families given) need more than 300 px, and their
    # labels more than a quarter of 800: the figure is taller and wider than asked
    w, h = many.get_size_inches() * many.dpi
    assert h > 300 and w > 800
    assert_legends_outside_the_axes(many)
    assert_legends_outside_the_axes(small)


def test_series_styles_are_distinct_and_follow_the_method_list():
    names = [f"m{i}" for i in range(_plots.MAX_SERIES)]
    styles = _plots.series_styles(names)
    pairs = [(s.color, s.marker) for s in styles.values()]
    # colour and marker alone tell the first 42 apart; with the line style, all 126
    assert len(set(pairs[:42])) == 42
    assert len({(s.color, s.marker, s.linestyle) for s in styles.values()}) == _plots.MAX_SERIES
    # any 7 consecutive series differ in colour (a family's rows are consecutive)
    for i in range(len(names) - 6):
        assert len({styles[n].color for n in names[i:i + 7]}) == 7
    # colour-blind-safe colours only (Okabe-Ito), never the references' black or grey
    assert {s.color for s in styles.values()} == set(_plots.PALETTE[:7])
    assert _plots.REFERENCE_STUDENT_STYLE.color not in _plots.SERIES_COLORS
    assert _plots.TEACHER_STYLE.color not in _plots.SERIES_COLORS
    assert "--" not in _plots.SERIES_LINESTYLES  # the student's dash is its own
    # deterministic by position in the list: the same list gives the same styles, and the
    # references take no position (adding them does not shift the others)
    again = _plots.series_styles(["ref", *names[:20]], reference_student="ref", teacher="T")
    assert all(again[n] == styles[n] for n in names[:20])
    assert again["ref"] == _plots.REFERENCE_STUDENT_STYLE and again["T"] == _plots.TEACHER_STYLE
    with pytest.raises(ValueError, match="at most 126"):
        _plots.series_styles([f"m{i}" for i in range(_plots.MAX_SERIES + 1)])
    with pytest.raises(ValueError, match="unique"):
        _plots.series_styles(["a", "a"])


def test_a_subset_keeps_the_styles_of_the_full_list():
    """A set where some methods have no result draws the rest as on every other figure."""
    styles = _plots.series_styles(["s", "a", "b", "c"], reference_student="s")
    full = metrics.line_figure({n: ([0, 1], [0, 1]) for n in ("s", "a", "b", "c")},
                               styles=styles)
    part = metrics.line_figure({n: ([0, 1], [0, 1]) for n in ("s", "c")}, styles=styles)
    assert line_styles(part) == {n: line_styles(full)[n] for n in ("s", "c")}
    assert to_hex(part.axes[0].get_lines()[1].get_color()) == to_hex(styles["c"].color)


def test_small_multiples_bad_inputs():
    series = {f"m{i}": ([0, 1], [0, 1]) for i in range(10)}
    with pytest.raises(ValueError, match="not a series"):
        metrics.line_figure(series, panels={"a": ["zz"]})
    with pytest.raises(ValueError, match="more than one panel"):
        metrics.line_figure(series, panels={"a": ["m1"], "b": ["m1"]})
    with pytest.raises(ValueError, match="not drawn"):
        metrics.line_figure(series, panels={"a": ["m1"]}, shared=["zz"])
    with pytest.raises(ValueError, match="no entry"):
        metrics.line_figure(series, styles={"m0": _plots.TEACHER_STYLE})
    # rows in no family get a panel of their own
    fig = metrics.line_figure(series, panels={"a": ["m0", "m1"]}, shared=["m9"])
    assert [ax.get_title() for ax in fig.axes] == ["a", "other"]
    assert [line.get_label() for line in fig.axes[1].get_lines()] == \
        [f"m{i}" for i in range(2, 10)]
