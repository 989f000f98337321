"""The sample report (tests.service.reports.sample) with its worst_case check run with
`certify`: the needle's numbers (found 1.00, certified 2.93 per unit radius; docs/theorem.md,
"Brackets"), its comparisons and verdict as the engine writes them (schemas.verdicts)."""

from __future__ import annotations

from typing import Any

from schemas.verdicts import check_verdict, compare, report_verdict
from tests.service.reports.sample import make_report

FOUND = 1.0
UPPER = 2.93


def _bracket(level: float, bound: float, found_error: float) -> dict[str, Any]:
    return {
        "found": FOUND,
        "upper": UPPER,
        "ratio": UPPER / FOUND,
        "relative_error": {"found": found_error, "upper": 1.5 * found_error},
        "proven": bound >= UPPER,
        "seconds": 0.05,
        "peak_memory_bytes": 4096,
        "images": [
            {
                "index": 0,
                "found": FOUND,
                "upper": UPPER,
                "ratio": UPPER / FOUND,
                "relative_error_upper": 1.5 * found_error,
                "method": "crown_linear",
                "seconds": 0.05,
                "peak_memory_bytes": 4096,
            }
        ],
    }


def certified_report(bound: float, policy: str = "fail") -> dict[str, Any]:
    """max_lipschitz = `bound`: proven above 2.93, unproven below (and `policy` decides)."""
    report = make_report()
    config = report["config"]["checks"][1]
    config["threshold"] = {"max_lipschitz": bound, "at_level": None}
    config["certify"] = {"intermediate": "crown", "unproven": policy}
    result = report["checks"][2]
    for row in result["levels"]:
        row["lipschitz_lower_bound"] = {"mean": FOUND, "max": FOUND}
        row["certified"] = _bracket(row["level"], bound, row["relative_error"]["max"])
    proven = bound >= UPPER
    comparisons = [compare("empirical Lipschitz lower bound", FOUND, bound)]
    if proven or policy == "fail":
        comparisons.append(
            compare(
                "certified upper bound of the worst change per unit radius, largest over levels",
                UPPER,
                bound,
            )
        )
    result["comparisons"] = comparisons
    result["certify"] = {
        "intermediate": "crown",
        "unproven": policy,
        "quantity": "the worst change per unit radius",
        "allowance": 1e-6,
        "reason": None,
        "proof": "proven" if proven else "unproven",
        "proven_level": 0.05 if proven else None,
        "device": "cpu",
        "seconds": 0.1,
        "peak_memory_bytes": 4096,
        "memory_measure": "rise of the process's peak resident set size",
    }
    result["verdict"] = check_verdict(comparisons, proven)
    report["verdict"] = report_verdict(report["checks"])
    return report
