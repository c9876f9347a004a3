"""Tests for the OpenCV plotting helpers: files written, size, curves where the data says."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from kdface import metrics
from kdface.metrics import _plots


def _has_colour(img, colour, tol=40):
    return bool(np.any(np.all(np.abs(img.astype(int) - np.array(colour)) <= tol, axis=-1)))


def test_line_plot_writes_png_and_draws_at_data_coordinates(tmp_path):
    path = tmp_path / "sub" / "line.png"
    img = metrics.line_plot(path, {"identity": ([0.0, 1.0], [0.0, 1.0])}, title="t",
                            xlabel="x", ylabel="y", size=(800, 600))
    back = cv2.imread(str(path))
    assert back.shape == (600, 800, 3)
    np.testing.assert_array_equal(back, img)
    # plot area x in [90, 770], y in [50, 530] with limits given by the data ± 4%: data
    # (0.5, 0.5) is still the centre pixel (430, 290)
    patch = img[288:293, 428:433].astype(int)
    assert np.any(np.all(np.abs(patch - np.array(_plots.PALETTE[0])) <= 40, axis=-1))
    # far from the line (data (0.9, 0.1)) the plot area is background or grid, not the curve
    assert not _has_colour(img[480:486, 700:706], _plots.PALETTE[0])


def test_plot_roc_of_verification_results(tmp_path):
    rng = np.random.default_rng(0)
    same = np.arange(400) % 2 == 0
    e1 = rng.normal(size=(400, 8))
    rocs = {}
    for name, strength in [("teacher", 2.0), ("student", 0.7)]:
        e2 = np.where(same[:, None], strength, 0.0) * e1 + rng.normal(size=(400, 8))
        rocs[name] = metrics.verification(e1, e2, same, far_targets=())["roc"]
    img = metrics.plot_roc(tmp_path / "roc.png", rocs, title="LFW", size=(640, 480))
    assert cv2.imread(str(tmp_path / "roc.png")).shape == (480, 640, 3)
    assert _has_colour(img, _plots.PALETTE[0]) and _has_colour(img, _plots.PALETTE[1])


def test_plot_accuracy_vs_probe_size(tmp_path):
    img = metrics.plot_accuracy_vs_probe_size(
        tmp_path / "lr.png", [8, 12, 16, 20, 112],
        {"S_KDim": [0.85, 0.93, 0.96, 0.97, 0.98], "T": [None, None, None, None, 0.99]},
        size=(700, 500))
    assert cv2.imread(str(tmp_path / "lr.png")).shape == (500, 700, 3)
    assert _has_colour(img, _plots.PALETTE[0]) and _has_colour(img, _plots.PALETTE[1])


def test_plot_ced(tmp_path):
    target = np.random.default_rng(1).uniform(0, 100, size=(20, 5, 2))
    r = metrics.nrmse_dataset(target + 1.0, target)
    metrics.plot_ced(tmp_path / "ced.png", {"model": r["ced"]})
    assert cv2.imread(str(tmp_path / "ced.png")).shape == (600, 800, 3)


def test_plot_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=".png"):
        metrics.line_plot(tmp_path / "a.jpg", {"a": ([0, 1], [0, 1])})
    with pytest.raises(ValueError, match="lengths differ"):
        metrics.line_plot(tmp_path / "a.png", {"a": ([0, 1, 2], [0, 1])})
    with pytest.raises(ValueError, match="at least one"):
        metrics.line_plot(tmp_path / "a.png", {})
    with pytest.raises(ValueError, match="3 accuracies for 2 probe sizes"):
        metrics.plot_accuracy_vs_probe_size(tmp_path / "a.png", [8, 16], {"m": [0.1, 0.2, 0.3]})
