"""PNG line plots drawn with OpenCV (matplotlib is not a dependency of kdface).

Enough for the evaluation report: ROC curves of several models on one figure per verification
set (log-FPR axis, as TAR@FAR tables read), accuracy vs probe size for the LR protocol of seed
wang2019 (Table 4: LR-LFW at 8/12/16/20 px and full size), and the landmark CED curve.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

# BGR, colour-blind-safe (Okabe-Ito) order
PALETTE = ((178, 114, 0), (0, 94, 213), (115, 158, 0), (167, 121, 204), (233, 180, 86),
           (66, 228, 240), (0, 159, 230), (0, 0, 0))
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MARGIN = dict(left=90, right=30, top=50, bottom=70)


def line_plot(path: str | os.PathLike, series: Mapping[str, tuple[Any, Any]], *,
              title: str = "", xlabel: str = "", ylabel: str = "",
              xlim: tuple[float, float] | None = None, ylim: tuple[float, float] | None = None,
              log_x: bool = False, markers: bool = False,
              size: tuple[int, int] = (800, 600)) -> np.ndarray:
    """Draws ``series`` {label: (x [n], y [n])} as coloured polylines and writes a PNG.

    size: (width, height) in pixels. Returns the image, uint8 [height, width, 3] (BGR). With
    ``log_x`` non-positive x values are dropped. Limits default to the data range.
    """
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"path must end with .png, got {str(path)!r}")
    if not series:
        raise ValueError("series must hold at least one {label: (x, y)} entry")
    width, height = size
    if width < 200 or height < 150:
        raise ValueError(f"size must be at least (200, 150), got {size}")
    data = {}
    for label, (x, y) in series.items():
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"series {label!r}: x and y lengths differ ({x.size} vs {y.size})")
        keep = np.isfinite(x) & np.isfinite(y) & ((x > 0) if log_x else True)
        data[label] = (x[keep], y[keep])
    xs = np.concatenate([v[0] for v in data.values()])
    ys = np.concatenate([v[1] for v in data.values()])
    if xs.size == 0:
        raise ValueError("no finite points to plot")
    # limits from the data get a 4% margin so end points do not sit on the frame
    xlim = xlim or _pad(float(xs.min()), float(xs.max()), log_x)
    ylim = ylim or _pad(float(ys.min()), float(ys.max()), False)
    axes = _Axes(width, height, xlim, ylim, log_x)

    img = np.full((height, width, 3), 255, np.uint8)
    axes.draw_frame(img, title, xlabel, ylabel)
    for i, (label, (x, y)) in enumerate(data.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = axes.to_pixels(x, y)
        if pts.shape[0] > 1:
            cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
        if markers or pts.shape[0] == 1:
            for px, py in pts:
                cv2.circle(img, (int(px), int(py)), 4, colour, -1, cv2.LINE_AA)
    axes.draw_legend(img, list(data))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"OpenCV could not write {str(path)!r}")
    return img


def plot_roc(path: str | os.PathLike, rocs: Mapping[str, Mapping[str, Any]], *,
             title: str = "ROC", log_fpr: bool = True, min_fpr: float | None = None,
             size: tuple[int, int] = (800, 600)) -> np.ndarray:
    """ROC curves of several models on one figure: ``rocs`` {model: {'fpr': [n], 'tpr': [n]}}.

    Takes the ``roc`` entry of :func:`kdface.metrics.verification`. On the log axis the FPR range
    starts at ``min_fpr`` (default: the decade below the smallest positive FPR).
    """
    series = {name: (r["fpr"], r["tpr"]) for name, r in rocs.items()}
    xlim = None
    if log_fpr:
        positive = np.concatenate([np.asarray(r["fpr"], float) for r in rocs.values()])
        positive = positive[positive > 0]
        lo = min_fpr or (10.0 ** math.floor(math.log10(positive.min())) if positive.size else 1e-6)
        xlim = (lo, 1.0)
    return line_plot(path, series, title=title, xlabel="False accept rate" +
                     (" (log)" if log_fpr else ""), ylabel="True accept rate",
                     xlim=xlim, ylim=(0.0, 1.0), log_x=log_fpr, size=size)


def plot_accuracy_vs_probe_size(path: str | os.PathLike, probe_sizes: Sequence[float],
                                accuracies: Mapping[str, Sequence[float]], *,
                                title: str = "Accuracy vs probe size",
                                ylabel: str = "Verification accuracy",
                                size: tuple[int, int] = (800, 600)) -> np.ndarray:
    """Accuracy of several models against probe resolution (seed wang2019 Table 4, LR-LFW).

    probe_sizes: [S] probe side lengths in pixels (e.g. 8, 12, 16, 20, 112); accuracies:
    {model: [S]} in the same order (None/NaN for sizes a model was not run at).
    """
    sizes = np.asarray(probe_sizes, np.float64)
    series = {}
    for name, acc in accuracies.items():
        acc = np.asarray([np.nan if a is None else a for a in acc], np.float64)
        if acc.shape != sizes.shape:
            raise ValueError(f"{name!r}: {acc.size} accuracies for {sizes.size} probe sizes")
        series[name] = (sizes, acc)
    return line_plot(path, series, title=title, xlabel="Probe size (px)", ylabel=ylabel,
                     markers=True, size=size)


def plot_ced(path: str | os.PathLike, ceds: Mapping[str, Mapping[str, Any]], *,
             title: str = "Cumulative error distribution",
             size: tuple[int, int] = (800, 600)) -> np.ndarray:
    """CED curves {model: nrmse_dataset(...)['ced']} on one figure."""
    series = {name: (c["errors"], c["fraction"]) for name, c in ceds.items()}
    return line_plot(path, series, title=title, xlabel="NRMSE", ylabel="Fraction of images",
                     ylim=(0.0, 1.0), size=size)


class _Axes:
    """Data-to-pixel mapping of the plot area, with ticks, grid, labels and legend."""

    def __init__(self, width: int, height: int, xlim: tuple[float, float],
                 ylim: tuple[float, float], log_x: bool):
        self.x0, self.x1 = _MARGIN["left"], width - _MARGIN["right"]
        self.y0, self.y1 = _MARGIN["top"], height - _MARGIN["bottom"]
        self.log_x = log_x
        fx = np.log10 if log_x else (lambda v: v)
        self.xlim = _widen(float(fx(xlim[0])), float(fx(xlim[1])))
        self.ylim = _widen(*ylim)

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """[n, 2] int32 pixel coordinates (clipped to the plot area) of data points."""
        u = np.log10(x) if self.log_x else x
        px = self.x0 + (u - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (self.x1 - self.x0)
        py = self.y1 - (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (self.y1 - self.y0)
        px = np.clip(px, self.x0, self.x1)
        py = np.clip(py, self.y0, self.y1)
        return np.round(np.stack([px, py], axis=1)).astype(np.int32)

    def draw_frame(self, img: np.ndarray, title: str, xlabel: str, ylabel: str) -> None:
        grey, black = (225, 225, 225), (0, 0, 0)
        for u in _ticks(*self.xlim, integer=self.log_x):
            px = int(round(self.x0 + (u - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
                           * (self.x1 - self.x0)))
            cv2.line(img, (px, self.y0), (px, self.y1), grey, 1)
            text = f"1e{int(u)}" if self.log_x else _fmt(u)
            _text(img, text, (px, self.y1 + 18), centre=True)
        for v in _ticks(*self.ylim):
            py = int(round(self.y1 - (v - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
                           * (self.y1 - self.y0)))
            cv2.line(img, (self.x0, py), (self.x1, py), grey, 1)
            _text(img, _fmt(v), (self.x0 - 8, py + 5), right=True)
        cv2.rectangle(img, (self.x0, self.y0), (self.x1, self.y1), black, 1)
        _text(img, title, ((self.x0 + self.x1) // 2, 30), centre=True, scale=0.7)
        _text(img, xlabel, ((self.x0 + self.x1) // 2, img.shape[0] - 20), centre=True)
        if ylabel:
            (w, h), base = cv2.getTextSize(ylabel, _FONT, 0.5, 1)
            strip = np.full((h + base + 4, w + 4, 3), 255, np.uint8)
            cv2.putText(strip, ylabel, (2, h + 2), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
            strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
            top = max((self.y0 + self.y1 - strip.shape[0]) // 2, 0)
            bottom = min(top + strip.shape[0], img.shape[0])
            img[top:bottom, 8:8 + strip.shape[1]] = strip[:bottom - top]

    def draw_legend(self, img: np.ndarray, labels: list[str]) -> None:
        widths = [cv2.getTextSize(s, _FONT, 0.5, 1)[0][0] for s in labels]
        box_w, box_h = max(widths) + 50, 22 * len(labels) + 8
        left, top = self.x1 - box_w - 10, self.y1 - box_h - 10
        cv2.rectangle(img, (left, top), (left + box_w, top + box_h), (255, 255, 255), -1)
        cv2.rectangle(img, (left, top), (left + box_w, top + box_h), (150, 150, 150), 1)
        for i, label in enumerate(labels):
            y = top + 18 + 22 * i
            cv2.line(img, (left + 8, y - 4), (left + 36, y - 4), PALETTE[i % len(PALETTE)], 2,
                     cv2.LINE_AA)
            _text(img, label, (left + 42, y))


def _pad(lo: float, hi: float, log: bool) -> tuple[float, float]:
    if log:
        a, b = math.log10(lo), math.log10(hi)
        d = 0.04 * (b - a)
        return 10.0 ** (a - d), 10.0 ** (b + d)
    d = 0.04 * (hi - lo)
    return lo - d, hi + d


def _widen(lo: float, hi: float) -> tuple[float, float]:
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.05 or 0.5
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, *, integer: bool = False, target: int = 6) -> np.ndarray:
    """Round tick values in [lo, hi]: steps of 1, 2 or 5 x 10^n (integers for log decades)."""
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    return np.arange(first, hi + step * 1e-9, step)


def _fmt(v: float) -> str:
    return f"{v:.6g}" if abs(v) >= 1e-12 else "0"


def _text(img: np.ndarray, text: str, org: tuple[int, int], *, centre: bool = False,
          right: bool = False, scale: float = 0.5) -> None:
    (w, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
    x = org[0] - (w // 2 if centre else w if right else 0)
    cv2.putText(img, text, (x, org[1]), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
