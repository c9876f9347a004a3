"""Tests for the matplotlib figures: PNG + PDF written and readable, data where it belongs.

The PNG is decoded with OpenCV, the PDF read as PDF (header, end marker, TrueType fonts, and
the text of its content streams decoded the way a PDF reader does: Flate-compressed streams,
string operands of TJ/Tj shown in the embedded font's two-byte codes).
"""
from __future__ import annotations

import re
import zlib

import cv2
import matplotlib
import numpy as np
import pytest

from kdface import metrics


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


def _written(paths, size):
    png, pdf = paths
    assert png.endswith(".png") and pdf == png[:-4] + ".pdf"
    image = cv2.imread(png)
    assert image is not None and image.shape == (size[1], size[0], 3)
    data = open(pdf, "rb").read()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert b"/FontFile2" in data and b"/Type3" not in data  # TrueType embedded, no Type 3
    return image, _pdf_text(data)


def test_line_plot_writes_png_and_pdf_with_its_labels(tmp_path):
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
