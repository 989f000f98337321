"""The report's figures as PNG bytes: error-vs-level curves here; image panels are drawn by
workers.shared.panels (the theorem checks draw theirs with it too).

matplotlib's object API on the Agg canvas (no pyplot: no global state, safe in any thread, no
display). Arrays come from the audit's .npy artifacts, read by the one array reader the engine
uses too (workers.shared.arrays.load_array: no pickles) and size-capped. Each figure is drawn
once and cropped to what it shows (workers.shared.panels.tight_png), on a canvas with room
for its labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import rcParams
from matplotlib.figure import Figure

from workers.shared.arrays import load_array
from workers.shared.errors import EngineInputError
from workers.shared.panels import tight_png

MAX_ARRAY_ELEMENTS = 4 * 1024 * 1024  # a panel never needs more; bigger files are skipped
DPI = 96
# Room around a plot's axes for its tick labels, axis labels and title: the PNG is cropped to
# what is drawn (tight_png), so it costs no space in the page, and what would reach past a
# figure of the plot's own size is drawn on the canvas, once.
MARGIN_INCHES = 0.75


@dataclass(frozen=True)
class Curve:
    label: str
    levels: list[float]
    values: list[float | None]
    style: str = "-"
    marker: str = "o"


def _plot_figure(width: float, height: float) -> Figure:
    """A figure with one axes where a width × height inch figure has it (matplotlib's default
    subplot parameters), with MARGIN_INCHES more canvas on every side."""
    margin = MARGIN_INCHES
    fig = Figure(figsize=(width + 2 * margin, height + 2 * margin))
    fig.subplots_adjust(
        left=(rcParams["figure.subplot.left"] * width + margin) / (width + 2 * margin),
        right=(rcParams["figure.subplot.right"] * width + margin) / (width + 2 * margin),
        bottom=(rcParams["figure.subplot.bottom"] * height + margin) / (height + 2 * margin),
        top=(rcParams["figure.subplot.top"] * height + margin) / (height + 2 * margin),
    )
    return fig


def _png(fig: Figure) -> bytes:
    return tight_png(fig, DPI)


@dataclass(frozen=True)
class Band:
    """A shaded range per level, [low, high] (a bracket: found below, certified above)."""

    label: str
    levels: list[float]
    low: list[float | None]
    high: list[float | None]


# a band reaching above this many times the curves' largest value is cut at the axis' top
BAND_CLIP = 10.0


def curves_png(
    title: str, ylabel: str, curves: list[Curve], bands: Sequence[Band] = ()
) -> bytes | None:
    """Lines of a quantity against the relative perturbation level, and shaded bands (clipped
    at BAND_CLIP times the lines' largest value); None when no line has a value."""
    drawable = [c for c in curves if any(v is not None and math.isfinite(v) for v in c.values)]
    if not drawable:
        return None
    fig = _plot_figure(6.0, 3.6)
    ax = fig.add_subplot()
    levels = [lv for c in drawable for lv in c.levels]
    for curve in drawable:
        points = [
            (lv, v)
            for lv, v in zip(curve.levels, curve.values, strict=True)
            if v is not None and math.isfinite(v)
        ]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, curve.style, marker=curve.marker, label=curve.label)
    top = max(v for c in drawable for v in c.values if v is not None and math.isfinite(v))
    for band in bands:
        spans = [
            (lv, lo, min(hi, BAND_CLIP * top) if top > 0 else hi)
            for lv, lo, hi in zip(band.levels, band.low, band.high, strict=True)
            if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
        ]
        if spans:
            xs, lows, highs = zip(*spans, strict=True)
            # each level's bracket as a bar, the band between levels shaded
            ax.vlines(xs, lows, highs, linewidth=6, alpha=0.35, color="C3", label=band.label)
            if len(xs) > 1:
                ax.fill_between(xs, lows, highs, alpha=0.15, color="C3")
            ax.plot(xs, highs, ":", marker="v", color="C3")
    if min(levels) > 0 and max(levels) / min(levels) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("relative perturbation level δ")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


@dataclass(frozen=True)
class BudgetPoint:
    """One worst_case level of a query-only audit: the queries the search had sent up to and
    including it (cumulative over the levels in ascending order), the largest error found."""

    level: float
    queries: int
    error: float


def budget_png(points: Sequence[BudgetPoint]) -> bytes | None:
    """What the query budget bought: the largest error found at each level against the
    cumulative queries sent to find it, each point labelled with its level; None without a
    finite point."""
    drawable = [p for p in points if math.isfinite(p.error)]
    if not drawable:
        return None
    fig = _plot_figure(6.0, 3.6)
    ax = fig.add_subplot()
    xs = [p.queries for p in drawable]
    ys = [p.error for p in drawable]
    ax.plot(xs, ys, "-", marker="o", label="worst case found (a lower bound)")
    for point in drawable:
        ax.annotate(
            f"δ = {point.level:g}",
            (point.queries, point.error),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize="small",
        )
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("queries sent by the worst-case search (cumulative over levels)")
    ax.set_ylabel("largest relative error found")
    ax.set_title("what the budget bought")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def artifact_array(path: Path) -> np.ndarray | None:
    """A .npy artifact as float64 (NaN and infinities drawn as 0), or None if it is missing,
    pickled, huge or not numeric: a figure the report cannot draw is left out."""
    try:
        array = load_array(path, max_elements=MAX_ARRAY_ELEMENTS, allow_non_finite=True)
    except EngineInputError:
        return None
    return np.nan_to_num(np.asarray(array, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
