"""The query budget settings of endpoint models' audits (service.settings): a documented default
per audit, a per-tenant cap per audit, validated when the service starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.problem import PROBLEM_TYPES
from service.settings import Settings


def test_the_defaults_are_the_documented_ones() -> None:
    settings = Settings(_env_file=None)
    assert settings.endpoint_query_budget == 100_000
    assert settings.tenant_max_endpoint_queries == 1_000_000
    assert settings.endpoint_query_budget_for(None) == 100_000
    assert settings.endpoint_query_budget_for(250_000) == 250_000


def test_they_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIGHTROPE_ENDPOINT_QUERY_BUDGET", "5000")
    monkeypatch.setenv("TIGHTROPE_TENANT_MAX_ENDPOINT_QUERIES", "20000")
    settings = Settings(_env_file=None)
    assert (settings.endpoint_query_budget, settings.tenant_max_endpoint_queries) == (5000, 20000)


@pytest.mark.parametrize(
    ("budget", "cap", "message"),
    [
        (0, 10, "greater than or equal to 1"),
        (10, 0, "greater than or equal to 1"),
        (11, 10, "above tenant_max_endpoint_queries"),
    ],
)
def test_a_default_over_the_cap_or_no_budget_stops_the_start(
    budget: int, cap: int, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(endpoint_query_budget=budget, tenant_max_endpoint_queries=cap)


def test_an_audit_may_not_ask_for_more_than_the_cap() -> None:
    settings = Settings(endpoint_query_budget=10, tenant_max_endpoint_queries=100)
    assert settings.endpoint_query_budget_for(100) == 100
    with pytest.raises(ValueError, match="101 queries is above this tenant's cap of 100"):
        settings.endpoint_query_budget_for(101)
    with pytest.raises(ValueError, match="at least 1 query"):
        settings.endpoint_query_budget_for(0)


def test_the_endpoint_problems_are_in_the_table() -> None:
    unavailable = PROBLEM_TYPES["endpoint-unavailable"]
    exhausted = PROBLEM_TYPES["query-budget-exhausted"]
    assert (unavailable.status, exhausted.status) == (502, 422)
    document = exhausted.document("the query budget of 10 is spent (10 sent)")
    assert document["type"].endswith("/query-budget-exhausted")
    assert document["status"] == 422
