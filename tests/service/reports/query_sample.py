"""The sample report (tests.service.reports.sample) as an endpoint model's query-only audit:
`model.format` "endpoint", `model.endpoint`, and the `queries` ledger the worker adds
(workers/shared/query_ledger.py's summary without `latencies_seconds`, plus `query_only`).
Its worst_case levels 0.01 and 0.05 found 0.3 and 0.9; worst_case sent 2000 and 3000 inputs
there, so the budget figure's points are (2000, 0.3) and (5000, 0.9)."""

from __future__ import annotations

from typing import Any

from tests.service.reports.sample import make_report

URL = "https://vendor.example/v2"
BUDGET = 100000


def _row(check: str, level: float | None, sent: int, failures: int = 0) -> dict[str, Any]:
    return {
        "check": check,
        "level": level,
        "sent": sent,
        "answered": sent - 10 * failures,
        "requests": sent // 10,
        "failures": failures,
        "retries": failures,
    }


def make_queries() -> dict[str, Any]:
    by_check = [
        _row("probe", None, 4),
        _row("random_noise", 0.01, 100),
        _row("random_noise", 0.05, 126),
        _row("worst_case", 0.01, 2000, failures=1),
        _row("worst_case", 0.05, 3000, failures=2),
    ]
    totals = {
        key: sum(row[key] for row in by_check)
        for key in ("sent", "answered", "requests", "failures", "retries")
    }
    return {
        "query_only": True,
        "budget": BUDGET,
        **totals,
        "latency_seconds": {"p50": 0.012, "p99": 0.08, "max": 0.1},
        "by_check": by_check,
        "by_image": [
            {"check": "worst_case", "level": 0.01, "image": 0, "answered": 995},
            {"check": "worst_case", "level": 0.01, "image": 1, "answered": 995},
        ],
        "failures_by_cause": {"http 503": 2, "timeout": 1},
    }


def make_query_report(
    model_name: str = "tiny-net", endpoint_model: str = "unet", version: str | None = "3"
) -> dict[str, Any]:
    report = make_report(model_name=model_name)
    # an endpoint model runs no lipschitz check (it needs gradients)
    report["checks"] = [c for c in report["checks"] if c["kind"] != "lipschitz"]
    report["config"]["checks"] = report["config"]["checks"][:2]
    report["model"]["format"] = "endpoint"
    report["model"]["endpoint"] = {
        "url": URL,
        "model_name": endpoint_model,
        "model_version": version,
    }
    report["queries"] = make_queries()
    return report
