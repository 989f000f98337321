"""report.html: one self-contained page rendered from report.json and the artifacts next to it
(docs/reports.md, "The HTML report").

The verdict comes first, then per check what was found in one sentence
(service.reports.findings), the
curves of error against the perturbation level (network, baseline, random noise), the image
panels of the worst case, and the provenance. Figures are PNG data URIs, so the file can be
mailed or archived alone. Jinja2 escapes every value (autoescape on), and a
Content-Security-Policy allows no script and no request: a model name such as
`<script>…</script>` is shown as text.

An endpoint model's query-only audit (the report's `queries`) says so under the model's name,
and gets a section "Queries": the ledger per check and level, latency, failures by cause, and
the figure "what the budget bought" (worst_case's error per level against its cumulative
queries).
"""

from __future__ import annotations

import base64
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from service.reports.findings import Finding, bracket_lines, bracket_rows, findings, fmt
from workers.reporting.figures import (
    BAND_CLIP,
    Band,
    BudgetPoint,
    Curve,
    artifact_array,
    budget_png,
    curves_png,
)
from workers.shared.panels import Panel, panels_figure, tight_png

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
SUBJECT_LABEL = {"model": "network", "reference": "reference model", "baseline": "baseline"}
# The kinds whose `certify` brackets get a table (docs/reports.md)
BRACKETED = ("worst_case", "lipschitz")


@dataclass
class Figure:
    title: str
    data_uri: str
    caption: str = ""


@dataclass
class CheckSection:
    index: int
    kind: str
    findings: list[Finding]
    figures: list[Figure] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)


def _data_uri(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()


def _levels(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in result.get("levels") or [] if isinstance(row, dict)]


def _series(result: dict[str, Any], quantity: str, statistic: str) -> tuple[list, list]:
    rows = _levels(result)
    values = []
    for row in rows:
        cell = row.get(quantity)
        value = cell.get(statistic) if isinstance(cell, dict) else None
        values.append(float(value) if isinstance(value, int | float) else None)
    return [float(row.get("level", 0.0)) for row in rows], values


def _bracket_band(finding: Finding) -> Band | None:
    """worst_case with `certify`: the certified relative error above the found one per level."""
    if not isinstance(finding.result.get("certify"), dict):
        return None
    levels, low, high = [], [], []
    for row in _levels(finding.result):
        bracket = row.get("certified")
        error = bracket.get("relative_error") if isinstance(bracket, dict) else None
        if not isinstance(error, dict):
            continue
        levels.append(float(row.get("level", 0.0)))
        low.append(_number(error.get("found")))
        high.append(_number(error.get("upper")))
    who = SUBJECT_LABEL.get(finding.subject, finding.subject)
    return Band(f"{who}: certified bracket", levels, low, high) if levels else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _error_curves(kind: str, group: list[Finding]) -> Figure | None:
    curves: list[Curve] = []
    bands: list[Band] = []
    for finding in group:
        who = SUBJECT_LABEL.get(finding.subject, finding.subject)
        if kind == "worst_case":
            levels, worst = _series(finding.result, "relative_error", "max")
            curves.append(Curve(f"{who}: worst case", levels, worst))
            levels, gaussian = _series(finding.result, "gaussian_relative_error", "max")
            curves.append(Curve(f"{who}: random noise, same size", levels, gaussian, "--", "s"))
            band = _bracket_band(finding)
            if band is not None:
                bands.append(band)
        else:
            levels, mean = _series(finding.result, "relative_error", "mean")
            curves.append(Curve(f"{who}: mean", levels, mean))
            levels, largest = _series(finding.result, "relative_error", "max")
            curves.append(Curve(f"{who}: largest", levels, largest, "--", "s"))
    title = "worst-case perturbation" if kind == "worst_case" else "random noise"
    uri = _data_uri(curves_png(title, "relative error ‖Ψ(y+e) − x‖/‖x‖", curves, bands))
    if uri is None:
        return None
    caption = (
        "Largest relative error over the audited images at each level, under the worst "
        "perturbation found and under random noise of the same norm (uniform on the sphere)."
        if kind == "worst_case"
        else "Relative error under random noise (uniform on the sphere) of each relative size: "
        "mean and largest."
    )
    if bands:
        caption += (
            " The bar from the worst case found up to the certified upper bound (‖Ψ(y) − x‖ + "
            f"U)/‖x‖ is the bracket the worst case lies in (cut at {BAND_CLIP:g} times the "
            "largest curve value where it reaches higher: see the bracket table)."
        )
    return Figure("Error against perturbation level", uri, caption)


def _bracket_table(finding: Finding) -> dict[str, Any] | None:
    """A check with `certify`: per bracket (worst_case's levels, lipschitz's ball) found ≤ truth
    ≤ U, U/L, proven, cost; worst_case adds the relative error's bracket."""
    section = finding.result.get("certify")
    if not isinstance(section, dict):
        return None
    lipschitz = finding.kind == "lipschitz"
    rows = []
    for where, _, bracket in bracket_rows(finding.result):
        error = bracket.get("relative_error") or {}
        proven = bracket.get("proven")
        cells = [
            fmt(_number(bracket.get("found"))),
            fmt(_number(bracket.get("upper"))),
            fmt(_number(bracket.get("ratio"))),
            *(
                []
                if lipschitz
                else [fmt(_number(error.get("found"))), fmt(_number(error.get("upper")))]
            ),
            "n/a" if proven is None else ("proven" if proven else "not proven"),
            fmt(_number(bracket.get("seconds"))),
            fmt(_number(bracket.get("peak_memory_bytes"))),
        ]
        rows.append({"level": where.split(" ", 1)[1], "cells": cells})
    who = SUBJECT_LABEL.get(finding.subject, finding.subject)
    found, upper = (
        ("found L (norm at y)", "certified U (over the ball)")
        if lipschitz
        else ("found L (change / ε)", "certified U / ε")
    )
    return {
        "title": f"{who}: certified bracket ({section.get('intermediate')} intermediate bounds)",
        "headers": [
            found,
            upper,
            "U/L",
            *([] if lipschitz else ["relative error found", "relative error certified"]),
            "threshold",
            "bound seconds",
            "peak memory (bytes)",
        ],
        "rows": rows,
        "level_header": "radius (relative to ‖y‖)" if lipschitz else "level δ",
        "note": " ".join(bracket_lines(finding.result)[-1:])
        + f". Memory: {section.get('memory_measure')}.",
    }


def _artifact(finding: Finding, directory: Path, suffix: str) -> Any:
    for name in finding.result.get("artifacts") or []:
        if isinstance(name, str) and name.endswith(suffix) and "/" not in name:
            return artifact_array(directory / name)
    return None


def _panel_level(finding: Finding) -> tuple[int, float] | None:
    """The level whose worst case is shown: the threshold's level, else the largest."""
    rows = _levels(finding.result)
    if not rows:
        return None
    wanted = (finding.config.get("threshold") or {}).get("at_level")
    for position, row in enumerate(rows):
        if row.get("level") == wanted:
            return position, float(row["level"])
    return len(rows) - 1, float(rows[-1].get("level", 0.0))


def _panels_png(panels: list[Panel]) -> bytes | None:
    figure = panels_figure(panels)
    return None if figure is None else tight_png(figure)


def _worst_case_panels(finding: Finding, directory: Path) -> Figure | None:
    chosen = _panel_level(finding)
    if chosen is None:
        return None
    position, level = chosen
    stem = f"worst_case-level{position}-"
    original = _artifact(finding, directory, stem + "original.npy")
    clean = _artifact(finding, directory, stem + "clean.npy")
    perturbed = _artifact(finding, directory, stem + "reconstruction.npy")
    perturbation = _artifact(finding, directory, stem + "perturbation.npy")
    panels = []
    if original is not None:
        panels.append(Panel("original x", original))
    if clean is not None:
        panels.append(Panel("clean reconstruction Ψ(y)", clean))
    if perturbed is not None:
        panels.append(Panel("perturbed reconstruction Ψ(y+e)", perturbed))
        reference = clean if clean is not None else original
        if reference is not None and reference.shape == perturbed.shape:
            label = "Ψ(y+e) − Ψ(y)" if clean is not None else "Ψ(y+e) − x"
            panels.append(Panel(f"difference {label}", perturbed - reference, signed=True))
    if perturbation is not None:
        space = finding.result.get("space", "measurement")
        panels.append(Panel(f"perturbation e ({space} space)", perturbation, signed=True))
    uri = _data_uri(_panels_png(panels))
    if uri is None:
        return None
    who = SUBJECT_LABEL.get(finding.subject, finding.subject)
    worst = (_levels(finding.result)[position].get("worst_image") or {}).get("index")
    return Figure(
        f"Worst case of the {who} at level {fmt(level)}",
        uri,
        f"Image {worst if worst is not None else '?'}: the audited image whose error grew most. "
        "Images with several channels (real and imaginary parts) are shown as magnitudes.",
    )


def _side_by_side(group: list[Finding], directory: Path) -> Figure | None:
    """With compare_with: the network's and the reference model's perturbed reconstructions
    of their worst image at the panels' level, next to each other."""
    by_subject = {finding.subject: finding for finding in group}
    if "model" not in by_subject or "reference" not in by_subject:
        return None
    panels = []
    for subject in ("model", "reference"):
        finding = by_subject[subject]
        chosen = _panel_level(finding)
        if chosen is None:
            return None
        position, level = chosen
        perturbed = _artifact(finding, directory, f"worst_case-level{position}-reconstruction.npy")
        worst = (_levels(finding.result)[position].get("worst_image") or {}).get("index")
        if perturbed is not None:
            label = f"{SUBJECT_LABEL[subject]}: Ψ(y+e), image {worst}, level {fmt(level)}"
            panels.append(Panel(label, perturbed))
    uri = _data_uri(_panels_png(panels)) if len(panels) == 2 else None
    if uri is None:
        return None
    return Figure(
        "Worst case: network and reference model side by side",
        uri,
        "Each model's perturbed reconstruction of its own worst image at the same level, under "
        "the same search, seeds and images.",
    )


# Columns of the per-level tables: (header, field of a level row, statistic or None for a number)
CLASSIFIER_COLUMNS: dict[str, list[tuple[str, str, str | None]]] = {
    "random_noise": [
        ("accuracy", "accuracy", None),
        ("failure probability", "failure_probability", "estimate"),
        ("95 % upper bound", "failure_probability", "ci_high"),
        ("prediction flipped", "flip_probability", "estimate"),
    ],
    "adversarial": [
        ("robust accuracy", "robust_accuracy", None),
        ("95 % interval low", "robust_accuracy_ci", "low"),
        ("95 % interval high", "robust_accuracy_ci", "high"),
        ("robust images", "robust", None),
    ],
}


def _table(kind: str, finding: Finding) -> dict[str, Any] | None:
    if finding.result.get("task") == "classification" or kind == "adversarial":
        return _rows_table(CLASSIFIER_COLUMNS.get(kind), finding)
    tables: dict[str, list[tuple[str, str, str | None]]] = {
        "worst_case": [
            ("relative error (max)", "relative_error", "max"),
            ("relative error (mean)", "relative_error", "mean"),
            ("random, same size (max)", "gaussian_relative_error", "max"),
            ("PSNR (min)", "psnr", "min"),
            ("SSIM (min)", "ssim", "min"),
            ("amplification (max)", "amplification", "max"),
            ("Lipschitz lower bound (max)", "lipschitz_lower_bound", "max"),
            # which search found the worst image, and how long the level ran
            ("worst found by", "worst_image", "optimizer"),
            ("steps (max)", "steps", "max"),
            # images whose worst case is the smaller level's perturbation (monotone curve)
            ("carried from level below", "carried", None),
        ],
        "random_noise": [
            ("relative error (mean)", "relative_error", "mean"),
            ("relative error (max)", "relative_error", "max"),
            ("PSNR (mean)", "psnr", "mean"),
            ("SSIM (mean)", "ssim", "mean"),
            ("failure probability", "failure_probability", "estimate"),
            ("95 % upper bound", "failure_probability", "ci_high"),
        ],
    }
    return _rows_table(tables.get(kind), finding)


def _rows_table(
    columns: Sequence[tuple[str, str, str | None]] | None, finding: Finding
) -> dict[str, Any] | None:
    if columns is None:
        return None
    rows = []
    for row in _levels(finding.result):
        cells = []
        for _, quantity, statistic in columns:
            cell = row.get(quantity)
            value = (
                cell
                if statistic is None
                else (cell.get(statistic) if isinstance(cell, dict) else None)
            )
            if isinstance(value, str):
                cells.append(value)
            else:
                cells.append(fmt(float(value)) if isinstance(value, int | float) else "n/a")
        # reconstruction and noise rows are per level δ; adversarial rows per ε
        level = row.get("level", row.get("epsilon"))
        rows.append({"level": fmt(level), "cells": cells})
    who = SUBJECT_LABEL.get(finding.subject, finding.subject)
    level_header = "ε" if finding.kind == "adversarial" else "level δ"
    return {
        "title": who,
        "headers": [c[0] for c in columns],
        "rows": rows,
        "level_header": level_header,
    }


def build_sections(report: dict[str, Any], directory: Path) -> list[CheckSection]:
    sections: dict[int, CheckSection] = {}
    for finding in findings(report):
        section = sections.setdefault(finding.index, CheckSection(finding.index, finding.kind, []))
        section.findings.append(finding)
    for section in sections.values():
        if section.kind in ("worst_case", "random_noise"):
            curve = _error_curves(section.kind, section.findings)
            if curve is not None:
                section.figures.append(curve)
        for finding in section.findings:
            if section.kind == "worst_case":
                panel = _worst_case_panels(finding, directory)
                if panel is not None:
                    section.figures.append(panel)
        if section.kind == "worst_case":
            side_by_side = _side_by_side(section.findings, directory)
            if side_by_side is not None:
                section.figures.append(side_by_side)
        for finding in section.findings:
            table = _table(section.kind, finding)
            if table is not None:
                section.tables.append(table)
            bracket = _bracket_table(finding) if section.kind in BRACKETED else None
            if bracket is not None:
                section.tables.append(bracket)
    return [sections[i] for i in sorted(sections)]


# The columns of the query table: a `by_check` row's counts (docs/reports.md, "Queries")
QUERY_COUNTS = ("sent", "answered", "requests", "failures", "retries")
QUERY_CHECK = "worst_case"


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _count_text(value: Any) -> str:
    count = _count(value)
    return "n/a" if count is None else str(count)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _query_rows(queries: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in queries.get("by_check") or [] if isinstance(row, dict)]


def _worst_errors(report: dict[str, Any]) -> list[tuple[float, float]]:
    """(level, largest relative error) of the queried model's worst_case results: the largest
    over its worst_case checks where several have the same level (the ledger counts them as
    one)."""
    out: list[tuple[float, float]] = []
    for finding in findings(report):
        if finding.kind != QUERY_CHECK or finding.subject != "model":
            continue
        levels, errors = _series(finding.result, "relative_error", "max")
        for level, error in zip(levels, errors, strict=True):
            if error is None:
                continue
            for position, (known, largest) in enumerate(out):
                if math.isclose(known, level, rel_tol=1e-9, abs_tol=0.0):
                    out[position] = (known, max(largest, error))
                    break
            else:
                out.append((level, error))
    return out


def budget_points(report: dict[str, Any]) -> list[BudgetPoint]:
    """Per worst_case level, ascending: the queries worst_case sent up to and including it
    (its `by_check` rows) and the largest error the report found there; [] without a
    worst_case check or its queries."""
    queries = report.get("queries")
    if not isinstance(queries, dict):
        return []
    errors = _worst_errors(report)
    if not errors:
        return []
    sent_by_level = sorted(
        (float(row["level"]), _count(row.get("sent")) or 0)
        for row in _query_rows(queries)
        if row.get("check") == QUERY_CHECK and _number(row.get("level")) is not None
    )
    points, cumulative = [], 0
    for level, sent in sent_by_level:
        cumulative += sent
        error = next(
            (e for known, e in errors if math.isclose(known, level, rel_tol=1e-9, abs_tol=0.0)),
            None,
        )
        if error is not None:
            points.append(BudgetPoint(level, cumulative, error))
    return points


@dataclass
class QueriesSection:
    """What the page shows of an endpoint model's query ledger (`queries`)."""

    url: str | None
    model_name: str | None
    model_version: str | None
    budget: int | None
    sent: int | None
    totals: list[str]
    rows: list[dict[str, Any]]
    latency: dict[str, str]
    causes: list[tuple[str, str]]
    figure: Figure | None


def queries_section(report: dict[str, Any]) -> QueriesSection | None:
    """The query-only audit's section, or None for a report without `queries` (an upload)."""
    queries = report.get("queries")
    if not isinstance(queries, dict):
        return None
    endpoint = _mapping(_mapping(report.get("model")).get("endpoint"))
    rows = [
        {
            "check": str(row.get("check", "?")),
            "level": "—" if row.get("level") is None else fmt(_number(row.get("level"))),
            "cells": [_count_text(row.get(key)) for key in QUERY_COUNTS],
        }
        for row in _query_rows(queries)
    ]
    latency = _mapping(queries.get("latency_seconds"))
    causes = _mapping(queries.get("failures_by_cause"))
    figure = None
    uri = _data_uri(budget_png(budget_points(report)))
    if uri is not None:
        figure = Figure(
            "What the budget bought",
            uri,
            "Per level δ of the worst-case search, in ascending order: the queries it had sent "
            "up to and including that level (retries counted), against the largest relative "
            "error it found there. Each is a real perturbation the model fails on, so a lower "
            "bound on the true worst case: more queries might find a larger one.",
        )

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    return QueriesSection(
        url=text(endpoint.get("url")),
        model_name=text(endpoint.get("model_name")),
        model_version=text(endpoint.get("model_version")),
        budget=_count(queries.get("budget")),
        sent=_count(queries.get("sent")),
        totals=[_count_text(queries.get(key)) for key in QUERY_COUNTS],
        rows=rows,
        latency={key: fmt(_number(latency.get(key))) for key in ("p50", "p99", "max")},
        causes=[(str(cause), str(count)) for cause, count in sorted(causes.items())],
        figure=figure,
    )


@functools.cache
def _environment() -> Environment:
    """One environment per process: it keeps the compiled template (compiling it took about
    as long as rendering the page's text)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["pretty_json"] = lambda value: json.dumps(
        value, indent=2, sort_keys=True, ensure_ascii=False
    )
    return env


def render_html(report: dict[str, Any], directory: Path) -> str:
    """The page for `report`, with figures from the artifacts in `directory`."""
    sections = build_sections(report, directory)
    all_findings = [f for s in sections for f in s.findings]
    counts = {
        verdict: sum(f.verdict == verdict for f in all_findings)
        for verdict in ("fail", "pass", "info", "proven")
    }
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            report=report,
            sections=sections,
            counts=counts,
            model=report.get("model") or {},
            queries=queries_section(report),
        )
    )


def write_report_html(directory: Path, report: dict[str, Any] | None = None) -> Path:
    """Render directory/report.html from directory/report.json (or the report given)."""
    if report is None:
        report = json.loads((directory / REPORT_JSON).read_text(encoding="utf-8"))
    path = directory / REPORT_HTML
    path.write_text(render_html(report, directory), encoding="utf-8")
    return path
