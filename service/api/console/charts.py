"""Curves of two reports on shared axes, as data for an inline SVG (templates/chart.html.j2).

Read from the plain numbers of report.json (docs/reports.md), never from figures: the gateway
draws no PNG and imports no plotting library. One chart per kind of check that has curves (a
quantity against the perturbation level, or against ε for `adversarial`); both audits' results
share its axes, audit A drawn solid with circles and audit B dashed with squares, so that the
two are told apart without colour too; a baseline's line is dotted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from service.reports.findings import fmt

# (label of the y axis, field of a level row, statistic or None for a plain number), tried in
# order: the first that has a number at some level is drawn.
QUANTITIES: dict[str, list[tuple[str, str, str | None]]] = {
    "worst_case": [("relative error (max)", "relative_error", "max")],
    "random_noise": [
        ("relative error (mean)", "relative_error", "mean"),
        ("accuracy", "accuracy", None),
        ("failure probability", "failure_probability", "estimate"),
    ],
    "adversarial": [("robust accuracy", "robust_accuracy", None)],
}
SUBJECT_LABEL = {"model": "network", "baseline": "baseline"}

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 44
# (colour, marker) per audit; the dash per audit and subject (a baseline is dotted).
STYLES = {"A": ("#1f4e9c", "circle"), "B": ("#a33a0a", "square")}
DASHES = {
    ("A", "model"): "",
    ("A", "baseline"): "2 4",
    ("B", "model"): "7 4",
    ("B", "baseline"): "7 3 2 3",
}


@dataclass
class Series:
    audit: str  # "A" or "B"
    subject: str  # "model" or "baseline"
    label: str
    points: list[tuple[float, float]]
    colour: str = ""
    dash: str = ""
    marker: str = "circle"
    path: str = ""  # "x,y x,y" in SVG coordinates
    marks: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Chart:
    kind: str
    title: str
    x_label: str
    y_label: str
    series: list[Series]
    x_ticks: list[tuple[float, str]] = field(default_factory=list)  # (SVG x, label)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)  # (SVG y, label)
    rows: list[dict[str, Any]] = field(default_factory=list)  # the numbers, as a table
    width: int = WIDTH
    height: int = HEIGHT
    plot: tuple[int, int, int, int] = (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _value(row: dict[str, Any], quantity: str, statistic: str | None) -> float | None:
    cell = row.get(quantity)
    if statistic is not None:
        cell = cell.get(statistic) if isinstance(cell, dict) else None
    return _number(cell)


def _points(result: dict[str, Any], quantity: str, statistic: str | None) -> list:
    points = []
    for row in result.get("levels") or []:
        if not isinstance(row, dict):
            continue
        x = _number(row.get("level", row.get("epsilon")))
        y = _value(row, quantity, statistic)
        if x is not None and y is not None:
            points.append((x, y))
    return sorted(points)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values covering [low, high] (1, 2 or 5 times a power of ten)."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value < high + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    return ticks


def compare_charts(reports: dict[str, dict[str, Any] | None]) -> list[Chart]:
    """The charts of `reports` ({"A": report, "B": report}; None: no report), one per kind."""
    found: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for audit, report in reports.items():
        results = (report or {}).get("checks") or []
        for result in results if isinstance(results, list) else []:
            if not isinstance(result, dict):
                continue
            kind = str(result.get("kind", ""))
            if kind in QUANTITIES:
                subject = str(result.get("subject", "model"))
                found.setdefault(kind, []).append((audit, subject, result))
    charts = []
    for kind, results in found.items():
        chart = _chart(kind, results)
        if chart is not None:
            charts.append(chart)
    return charts


def _series(results: list[tuple[str, str, dict[str, Any]]], kind: str) -> tuple[str, list[Series]]:
    """(y label, series) of the first quantity of this kind that has numbers."""
    for y_label, quantity, statistic in QUANTITIES[kind]:
        series = []
        for audit, subject, result in results:
            points = _points(result, quantity, statistic)
            if points:
                who = SUBJECT_LABEL.get(subject, subject)
                series.append(Series(audit, subject, f"{audit}: {who}", points))
        if series:
            return y_label, series
    return "", []


def _chart(kind: str, results: list[tuple[str, str, dict[str, Any]]]) -> Chart | None:
    y_label, series = _series(results, kind)
    if not series:
        return None
    x_label = "ε" if kind == "adversarial" else "perturbation level δ"
    chart = Chart(kind, kind.replace("_", " "), x_label, y_label, series)
    _lay_out(chart)
    return chart


def _lay_out(chart: Chart) -> None:
    xs = [x for s in chart.series for x, _ in s.points]
    ys = [y for s in chart.series for _, y in s.points]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(0.0, min(ys)), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    left, top, right, bottom = chart.plot

    def sx(x: float) -> float:
        return round(left + (x - x0) / (x1 - x0) * (right - left), 2)

    def sy(y: float) -> float:
        return round(bottom - (y - y0) / (y1 - y0) * (bottom - top), 2)

    chart.x_ticks = [(sx(t), fmt(t, 3)) for t in x_ticks]
    chart.y_ticks = [(sy(t), fmt(t, 3)) for t in y_ticks]
    for s in chart.series:
        s.colour, s.marker = STYLES.get(s.audit, STYLES["A"])
        s.dash = DASHES.get((s.audit, s.subject), "1 2")
        s.marks = [(sx(x), sy(y)) for x, y in s.points]
        s.path = " ".join(f"{x},{y}" for x, y in s.marks)
    levels = sorted({x for s in chart.series for x, _ in s.points})
    for level in levels:
        cells = []
        for s in chart.series:
            value = dict(s.points).get(level)
            cells.append(fmt(value) if value is not None else "n/a")
        chart.rows.append({"level": fmt(level), "cells": cells})
