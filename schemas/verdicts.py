"""Verdicts from threshold comparisons: the one place a check's and an audit's verdict are
decided (docs/reports.md, "Verdicts"). The engine's checks build their comparisons with
`compare` and `judge`; the report writer, the HTML and JUnit renderers and the gate only read
what this module decided. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from schemas.reports import Direction


def fmt(value: float | None, digits: int = 4) -> str:
    """A number as reports show it: 4 significant digits, `n/a` for a missing one."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def compare(
    quantity: str,
    measured: float | None,
    bound: float,
    direction: Direction = "at_most",
    *,
    passed: bool | None = None,
) -> dict[str, Any]:
    """One comparison (schemas.reports.ThresholdComparison as JSON). A missing or non-finite
    measurement does not pass; `passed` overrides that only where a threshold says what an
    unmeasured value means (minimal_perturbation's `unmeasured_median`)."""
    value = None if measured is None else float(measured)
    if passed is None:
        passed = (
            value is not None
            and math.isfinite(value)
            and (value <= bound if direction == "at_most" else value >= bound)
        )
    return {
        "quantity": quantity,
        "measured": value if value is None or math.isfinite(value) else None,
        "bound": float(bound),
        "direction": direction,
        "passed": bool(passed),
    }


def check_verdict(comparisons: Sequence[Mapping[str, Any]]) -> str:
    """`info` without comparisons (no threshold, or nothing the threshold applies to);
    `fail` when any comparison failed; `pass` otherwise."""
    if not comparisons:
        return "info"
    return "pass" if all(c["passed"] for c in comparisons) else "fail"


def judge(result: dict[str, Any], comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """Put the comparisons and the verdict computed from them into a check's result."""
    result["comparisons"] = comparisons
    result["verdict"] = check_verdict(comparisons)
    return result


def audit_verdict(verdicts: Iterable[str]) -> str:
    """`fail` if any check fails; `pass` if one passes and none fails; `info` otherwise."""
    seen = set(verdicts)
    if "fail" in seen:
        return "fail"
    if "pass" in seen:
        return "pass"
    return "info"
