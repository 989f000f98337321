"""schemas.reports.Report accepts (and documents) an endpoint model's `queries` and
`model.endpoint`; an upload's report needs neither."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas.reports import Report
from tests.service.reports.query_sample import URL, make_query_report
from tests.service.reports.sample import make_report


def test_a_query_only_report_validates() -> None:
    report = Report.model_validate(make_query_report())
    assert report.queries is not None and report.queries.query_only
    assert report.queries.sent == 5230 and report.queries.budget == 100000
    assert report.queries.by_check[0].level is None
    assert report.queries.failures_by_cause == {"http 503": 2, "timeout": 1}
    assert report.model.endpoint is not None and report.model.endpoint.url == URL


def test_an_upload_needs_neither() -> None:
    report = Report.model_validate(make_report())
    assert report.queries is None and report.model.endpoint is None


@pytest.mark.parametrize("missing", ["sent", "latency_seconds", "by_check"])
def test_a_broken_ledger_is_refused(missing: str) -> None:
    report: dict[str, Any] = make_query_report()
    del report["queries"][missing]
    with pytest.raises(ValidationError):
        Report.model_validate(report)


def test_the_schema_documents_the_fields() -> None:
    schema = Report.model_json_schema()
    assert "queries" in schema["properties"] and "queries" not in schema["required"]
    definitions = schema["$defs"]
    assert {"sent", "budget", "by_check", "failures_by_cause"} <= set(
        definitions["Queries"]["properties"]
    )
    assert "endpoint" in definitions["ModelIdentity"]["properties"]
    assert definitions["EndpointIdentity"]["required"] == ["url", "model_name"]
