"""JUnit XML of a report, for CI systems (docs/reports.md, "JUnit").

One <testsuite name="tightrope">; one <testcase> per check result (check × subject). A check
with a threshold passes or fails by the engine's verdict; a failure's message and text carry
every measured value and its bound. A check without a threshold is informational: it is a
<skipped> test case, so CI shows it without failing. With `compare_with`, one more test case
per compared figure (`comparison`), failing on a regression beyond `max_regression`; the
reference model's own check results are skipped (context, not the gate). Torch-free: the
gateway renders it on the fly from report.json, the CLI writes it as junit.xml.

A worst_case or lipschitz check with `certify`: its test case's text shows each bracket [found,
U] (per level; lipschitz's over its ball) with U/L and whether it is proven, and the proof (a
`proven` check passes).

A stochastic model (docs/reports.md, "Stochastic models"): the suite's properties carry its
noise floor with its interval; each check's test case carries its `sampler` figures as
properties (draws, replicates, samples, standard errors, probabilities with their intervals,
an estimate and standard error next to each bound judged on an interval's end) and says in
its output what it measures of the sampler; with `sampler_threshold`, one more test case
(`model sampler_threshold`) judges the model's own figures.

An endpoint model's query-only audit (the report's `queries`): the suite's properties say so
(`query_only`, `query_budget`, `queries_sent`, ...), and the suite's <system-out> and the end
of the queried model's test cases' text say "query-only audit, budget N" and what was sent.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from service.reports.findings import (
    Comparison,
    Finding,
    bracket_lines,
    bracket_rows,
    findings,
    fmt,
)

MEDIA_TYPE = "application/xml"

# Characters XML 1.0 forbids (production 2, "Char"): C0 controls other than tab, newline and
# carriage return, lone surrogates, U+FFFE and U+FFFF. ElementTree writes them as they are, so a
# model name or description holding one would make the document unparsable.
_NOT_XML_CHAR = re.compile(r"[^\t\n\r\x20-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")
REPLACEMENT = "\ufffd"


def xml_safe(text: str) -> str:
    """`text` with every character XML 1.0 forbids replaced by U+FFFD."""
    return _NOT_XML_CHAR.sub(REPLACEMENT, text)


def _sanitize(root: ET.Element) -> None:
    """Make every text and attribute value of the tree valid XML 1.0 (the tags and attribute
    names are this module's own)."""
    for element in root.iter():
        if element.text:
            element.text = xml_safe(element.text)
        if element.tail:
            element.tail = xml_safe(element.tail)
        for key, value in element.attrib.items():
            element.attrib[key] = xml_safe(value)


def _comparison_text(c: Comparison) -> str:
    return f"{c.quantity}: measured {fmt(c.measured, 6)} {c.relation} bound {fmt(c.bound, 6)}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _probability_figures(name: str, data: Any) -> list[tuple[str, str]]:
    """A probability of the report ({count, trials, estimate, ci_low, ci_high}) as properties."""
    if not isinstance(data, dict):
        return []
    return [
        (f"sampler: {name}", fmt(_number(data.get("estimate")), 6)),
        (f"sampler: {name} ci_low", fmt(_number(data.get("ci_low")), 6)),
        (f"sampler: {name} ci_high", fmt(_number(data.get("ci_high")), 6)),
        (f"sampler: {name} trials", fmt(_number(data.get("trials")), 6)),
    ]


def sampler_figures(result: dict[str, Any]) -> list[tuple[str, str]]:
    """A stochastic subject's figures of one check result, as (name, value) properties: its
    settings, the standard errors of the average map's figures and the probabilities over its
    draws with their intervals. [] for a deterministic subject's result (no `sampler`)."""
    sampler = result.get("sampler")
    if not isinstance(sampler, dict):
        return []
    out = [
        (f"sampler: {key}", fmt(_number(sampler.get(key)), 6))
        for key in ("draws", "replicates", "samples", "contrast")
        if _number(sampler.get(key)) is not None
    ]
    errors = result.get("standard_error")
    kind = result.get("kind")
    if kind == "lipschitz" and isinstance(errors, dict):
        out.append(
            (
                "sampler: standard error of the largest Jacobian spectral norm",
                fmt(_number(errors.get("max")), 6),
            )
        )
    if kind == "false_positive" and isinstance(errors, dict):
        contrast = errors.get("spurious_contrast") or {}
        out.append(
            (
                "sampler: standard error of the largest spurious contrast",
                fmt(_number(contrast.get("max")), 6),
            )
        )
    if kind == "worst_case":
        for row in result.get("levels") or []:
            level_errors = row.get("standard_error") if isinstance(row, dict) else None
            if not isinstance(level_errors, dict):
                continue
            level = fmt(_number(row.get("level")))
            for name in ("relative_error", "lipschitz_lower_bound"):
                out.append(
                    (
                        f"sampler: standard error of the largest {name} at level {level}",
                        fmt(_number((level_errors.get(name) or {}).get("max")), 6),
                    )
                )
    hallucination = result.get("hallucination")
    if isinstance(hallucination, dict):
        for where in ("clean", "attacked"):
            out += _probability_figures(
                f"hallucination probability ({where})", hallucination.get(where)
            )
    if kind == "false_negative":
        out += _probability_figures("miss rate over the draws", result.get("miss_rate"))
    return out


def _comparison_figures(c: dict[str, Any]) -> list[tuple[str, str]]:
    """A bound judged on an interval's end: the estimate and standard error behind it."""
    if c.get("estimate") is None and c.get("standard_error") is None:
        return []
    quantity = c.get("quantity", "?")
    return [
        (f"estimate: {quantity}", fmt(_number(c.get("estimate")), 6)),
        (f"standard error: {quantity}", fmt(_number(c.get("standard_error")), 6)),
    ]


def _sampler_lines(result: dict[str, Any]) -> list[str]:
    sampler = result.get("sampler")
    if not isinstance(sampler, dict) or not sampler.get("measures"):
        return []
    lines = [f"Of the sampler: {sampler['measures']}"]
    lines += [f"{name}: {value}" for name, value in sampler_figures(result)]
    return lines


def _bracket_properties(result: dict[str, Any]) -> list[tuple[str, str]]:
    """A check with `certify`: the proof and each bracket (per worst_case level, lipschitz's
    one) as properties."""
    section = result.get("certify")
    if not isinstance(section, dict):
        return []
    out = [("certified: proof", str(section.get("proof") or "none"))]
    for where, _, bracket in bracket_rows(result):
        out += [
            (f"certified: found at {where}", fmt(_number(bracket.get("found")), 6)),
            (f"certified: upper at {where}", fmt(_number(bracket.get("upper")), 6)),
        ]
    return out


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "n/a"


def query_properties(report: dict[str, Any]) -> list[tuple[str, str]]:
    """An endpoint model's audit (`queries`, docs/reports.md, "Queries of an endpoint audit"):
    the suite's properties saying it was query-only, its budget and what was sent; [] for an
    uploaded model."""
    queries = report.get("queries")
    if not isinstance(queries, dict):
        return []
    return [
        ("query_only", "true" if queries.get("query_only", True) is not False else "false"),
        ("query_budget", _count(queries.get("budget"))),
        ("queries_sent", _count(queries.get("sent"))),
        ("queries_answered", _count(queries.get("answered"))),
        ("query_failures", _count(queries.get("failures"))),
        ("query_retries", _count(queries.get("retries"))),
    ]


def query_lines(report: dict[str, Any]) -> list[str]:
    """The words an endpoint model's audit adds to the queried model's test cases and the
    suite's output; [] for an uploaded model."""
    queries = report.get("queries")
    if not isinstance(queries, dict):
        return []
    model = report.get("model")
    endpoint = model.get("endpoint") if isinstance(model, dict) else None
    where = ""
    if isinstance(endpoint, dict) and endpoint.get("url"):
        version = endpoint.get("model_version")
        where = (
            f" through its endpoint {endpoint.get('url')} (model {endpoint.get('model_name')}"
            f"{'' if version is None else ' ' + str(version)})"
        )
    return [
        f"query-only audit, budget {_count(queries.get('budget'))}: the model was audited"
        f"{where} by queries alone, {_count(queries.get('sent'))} queries sent, "
        f"{_count(queries.get('answered'))} answered, {_count(queries.get('failures'))} failed "
        f"({_count(queries.get('retries'))} retries)",
        "A worst case found by queries is a lower bound on the true worst case: a fail is "
        "proof, a pass is weaker evidence than a white-box pass.",
    ]


def _testcase(suite: ET.Element, finding: Finding, notes: Sequence[str] = ()) -> bool:
    """Add the test case (`notes`: lines to end its output with); True when it failed."""
    case = ET.SubElement(
        suite,
        "testcase",
        name=finding.name,
        classname=f"tightrope.{finding.kind}",
        time=f"{0.0:.3f}",
    )
    properties = ET.SubElement(case, "properties")
    ET.SubElement(properties, "property", name="subject", value=finding.subject)
    ET.SubElement(properties, "property", name="verdict", value=finding.verdict)
    for c in finding.comparisons:
        ET.SubElement(
            properties, "property", name=f"measured: {c.quantity}", value=fmt(c.measured, 6)
        )
        ET.SubElement(properties, "property", name=f"bound: {c.quantity}", value=fmt(c.bound, 6))
    extra = [
        pair
        for c in finding.result.get("comparisons") or []
        if isinstance(c, dict)
        for pair in _comparison_figures(c)
    ] + sampler_figures(finding.result)
    for name, value in extra:
        ET.SubElement(properties, "property", name=name, value=value)
    for name, value in _bracket_properties(finding.result):
        ET.SubElement(properties, "property", name=name, value=value)
    sampler = _sampler_lines(finding.result) + bracket_lines(finding.result) + list(notes)
    if finding.subject == "reference" or not finding.has_threshold:
        reason = (
            "context: the reference model's own result (compare_with)"
            if finding.subject == "reference"
            else "informational: the check has no threshold"
        )
        ET.SubElement(case, "skipped", message=reason)
        ET.SubElement(case, "system-out").text = "\n".join([finding.sentence, *sampler])
        return False
    if finding.verdict == "fail":
        failed = [c for c in finding.comparisons if not c.passed] or finding.comparisons
        message = "; ".join(_comparison_text(c) for c in failed) or "the check failed"
        failure = ET.SubElement(case, "failure", message=message, type="threshold")
        failure.text = "\n".join(
            [finding.sentence, *(_comparison_text(c) for c in finding.comparisons), *sampler]
        )
        return True
    ET.SubElement(case, "system-out").text = "\n".join(
        [finding.sentence, *(_comparison_text(c) for c in finding.comparisons), *sampler]
    )
    return False


def _regression_text(figure: dict[str, Any]) -> str:
    return (
        f"{figure.get('quantity')}: model {fmt(figure.get('model'), 6)}, reference "
        f"{fmt(figure.get('reference'), 6)}, regression {fmt(figure.get('regression'), 6)} "
        f"{'≤' if figure.get('passed') else '>'} max_regression "
        f"{fmt(figure.get('max_regression'), 6)}"
    )


def _regression_cases(suite: ET.Element, comparison: dict[str, Any]) -> tuple[int, int]:
    """One test case per compared figure; (cases, failures)."""
    cases = failures = 0
    for check in comparison.get("checks", []):
        for figure in check.get("figures", []):
            cases += 1
            case = ET.SubElement(
                suite,
                "testcase",
                name=f"c{int(check.get('index', 0)):02d} {check.get('kind')} regression: "
                f"{figure.get('quantity')}",
                classname=f"tightrope.regression.{check.get('kind')}",
                time=f"{0.0:.3f}",
            )
            properties = ET.SubElement(case, "properties")
            for key in ("model", "reference", "difference", "regression", "max_regression"):
                ET.SubElement(properties, "property", name=key, value=fmt(figure.get(key), 6))
            text = _regression_text(figure)
            if figure.get("passed"):
                ET.SubElement(case, "system-out").text = text
            else:
                failures += 1
                ET.SubElement(case, "failure", message=text, type="regression").text = text
    return cases, failures


def _noise_floor_properties(model: dict[str, Any]) -> list[tuple[str, str]]:
    """The suite's properties of a stochastic model: stochastic, spread, noise floor."""
    if model.get("stochastic") is not True:
        return []
    out = [
        ("model_stochastic", "true"),
        ("model_output_spread", fmt(_number(model.get("output_spread")), 6)),
    ]
    floor = model.get("noise_floor")
    if isinstance(floor, dict):
        for key in ("value", "ci_low", "ci_high", "confidence", "draws_per_input", "inputs"):
            out.append((f"noise_floor_{key}", fmt(_number(floor.get(key)), 6)))
    return out


def _model_case(suite: ET.Element, model: dict[str, Any]) -> tuple[int, int]:
    """The model's own comparisons (`sampler_threshold`) as one test case; (cases, failures)."""
    raw = model.get("comparisons")
    if not isinstance(raw, list) or not raw:
        return 0, 0
    comparisons = [Comparison.from_report(c) for c in raw if isinstance(c, dict)]
    case = ET.SubElement(
        suite,
        "testcase",
        name="model sampler_threshold",
        classname="tightrope.model",
        time=f"{0.0:.3f}",
    )
    properties = ET.SubElement(case, "properties")
    for c in comparisons:
        ET.SubElement(
            properties, "property", name=f"measured: {c.quantity}", value=fmt(c.measured, 6)
        )
        ET.SubElement(properties, "property", name=f"bound: {c.quantity}", value=fmt(c.bound, 6))
    floor = model.get("noise_floor")
    lines = [_comparison_text(c) for c in comparisons]
    if isinstance(floor, dict):
        lines.append(
            f"noise floor {fmt(_number(floor.get('value')), 6)} (95 % interval "
            f"{fmt(_number(floor.get('ci_low')), 6)} to {fmt(_number(floor.get('ci_high')), 6)})"
        )
    failed = [c for c in comparisons if not c.passed]
    if failed:
        message = "; ".join(_comparison_text(c) for c in failed)
        ET.SubElement(case, "failure", message=message, type="threshold").text = "\n".join(lines)
        return 1, 1
    ET.SubElement(case, "system-out").text = "\n".join(lines)
    return 1, 0


def render_junit(report: dict[str, Any]) -> str:
    found = findings(report)
    suite = ET.Element("testsuite", name="tightrope")
    properties = ET.SubElement(suite, "properties")
    model = report.get("model") or {}
    for name, value in (
        ("audit_id", report.get("audit_id")),
        ("model_name", model.get("name")),
        ("model_sha256", model.get("sha256")),
        ("verdict", report.get("verdict")),
        ("seed", report.get("seed")),
    ):
        ET.SubElement(properties, "property", name=name, value="" if value is None else str(value))
    for name, text in _noise_floor_properties(model) + query_properties(report):
        ET.SubElement(properties, "property", name=name, value=text)
    # an endpoint model's audit: its test cases (the queried model's) say it was query-only
    notes = query_lines(report)
    failures = sum(
        _testcase(suite, finding, notes if finding.subject == "model" else ()) for finding in found
    )
    model_cases, model_failures = _model_case(suite, model)
    cases, regressions = _regression_cases(suite, report.get("comparison") or {})
    suite.set("tests", str(len(found) + model_cases + cases))
    suite.set("failures", str(failures + model_failures + regressions))
    suite.set("errors", "0")
    suite.set("skipped", str(sum(f.subject == "reference" or not f.has_threshold for f in found)))
    suite.set("time", f"{float((report.get('cost') or {}).get('wall_seconds') or 0.0):.3f}")
    if notes:
        ET.SubElement(suite, "system-out").text = "\n".join(notes)
    return _document(suite)


def render_error_junit(message: str) -> str:
    """JUnit XML for a gate that could not produce a report (bad key, unreachable service,
    rejected model): one errored test case naming the cause, so CI shows why."""
    suite = ET.Element(
        "testsuite", name="tightrope", tests="1", failures="0", errors="1", skipped="0"
    )
    suite.set("time", "0.000")
    case = ET.SubElement(suite, "testcase", name="audit", classname="tightrope.gate")
    case.set("time", "0.000")
    error = ET.SubElement(case, "error", message=message, type="error")
    error.text = message
    return _document(suite)


def _document(suite: ET.Element) -> str:
    """The suite inside a <testsuites> root carrying its totals, sanitised and serialised."""
    root = ET.Element("testsuites", name="tightrope")
    root.append(suite)
    for key in ("tests", "failures", "errors", "skipped", "time"):
        root.set(key, suite.get(key, "0"))
    _sanitize(root)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
