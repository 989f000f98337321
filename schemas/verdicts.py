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


# The verdicts of a check that count as passing: `proven` is a pass whose threshold a certified
# upper bound proves (worst_case or lipschitz with `certify`: docs/theorem.md, "Brackets").
PASSING = ("pass", "proven")


def check_verdict(comparisons: Sequence[Mapping[str, Any]], proven: bool = False) -> str:
    """`info` without comparisons (no threshold, or nothing the threshold applies to);
    `fail` when any comparison failed; `proven` when every comparison passed and the check
    proved its whole threshold by certified bounds (`proven`); `pass` otherwise."""
    if not comparisons:
        return "info"
    if not all(c["passed"] for c in comparisons):
        return "fail"
    return "proven" if proven else "pass"


def proven_by(result: Mapping[str, Any]) -> bool:
    """Whether a check result proved its threshold by certified bounds: its `certify` section
    says `proof: "proven"` (worst_case or lipschitz with `certify`; docs/reports.md)."""
    section = result.get("certify")
    return isinstance(section, Mapping) and section.get("proof") == "proven"


def judge(
    result: dict[str, Any], comparisons: list[dict[str, Any]], proven: bool = False
) -> dict[str, Any]:
    """Put the comparisons and the verdict computed from them into a check's result."""
    result["comparisons"] = comparisons
    result["verdict"] = check_verdict(comparisons, proven)
    return result


def audit_verdict(verdicts: Iterable[str]) -> str:
    """`fail` if any check fails; `pass` if one passes (or is `proven`) and none fails; `info`
    otherwise. The audit's verdict is never `proven`: that is a check's."""
    seen = set(verdicts)
    if "fail" in seen:
        return "fail"
    if seen & set(PASSING):
        return "pass"
    return "info"


def compare_regression(
    quantity: str,
    level: float | None,
    model: float | None,
    reference: float | None,
    max_regression: float,
    direction: str = "at_most",
) -> dict[str, Any]:
    """One figure of the model against the same figure of the reference model (the report's
    `comparison`). `direction` is the figure's good side: `at_most` (lower is better) or
    `at_least`. `regression` = (model − reference)/|reference| in the worse direction (negative:
    better); a reference of 0 divides by 1e-12, so any worsening of a perfect figure fails.
    Passes when `regression <= max_regression`; a figure missing from one model does not pass,
    one missing from both (nothing measured either time) does."""
    new = None if model is None or not math.isfinite(model) else float(model)
    old = None if reference is None or not math.isfinite(reference) else float(reference)
    difference = regression = None
    if new is not None and old is not None:
        difference = new - old
        worse = difference if direction == "at_most" else -difference
        regression = worse / max(abs(old), 1e-12)
        passed = regression <= max_regression
    else:
        passed = new is None and old is None
    return {
        "quantity": quantity,
        "level": level,
        "direction": direction,
        "model": new,
        "reference": old,
        "difference": difference,
        "regression": regression,
        "max_regression": float(max_regression),
        "passed": bool(passed),
    }


def report_verdict(
    checks: Iterable[Mapping[str, Any]],
    comparison: Mapping[str, Any] | None = None,
    model_comparisons: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The audit's verdict: from the check results of the model (and the baseline), and with a
    reference model from the comparison's verdict too (a regression fails the audit). The
    reference's own check results are context; they do not decide the verdict. The model's own
    comparisons (`sampler_threshold`: the report's `model.comparisons`) count as one more
    check."""
    verdicts = [c["verdict"] for c in checks if c.get("subject") != "reference"]
    if comparison is not None:
        verdicts.append(comparison["verdict"])
    if model_comparisons:
        verdicts.append(check_verdict(model_comparisons))
    return audit_verdict(verdicts)
