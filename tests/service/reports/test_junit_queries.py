"""JUnit XML of an endpoint model's query-only audit: the suite's properties (query_only,
query_budget, queries_sent, ...) and its and the model's test cases' text say so; an uploaded
model's JUnit is unchanged."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from service.reports.junit import render_junit
from tests.service.reports.query_sample import BUDGET, URL, make_query_report
from tests.service.reports.sample import make_report


def _suite(xml: str) -> ET.Element:
    (suite,) = ET.fromstring(xml).findall("testsuite")
    return suite


def _suite_properties(suite: ET.Element) -> dict[str, str | None]:
    properties = suite.find("properties")
    assert properties is not None
    return {p.get("name", ""): p.get("value") for p in properties.findall("property")}


def test_the_suite_says_it_was_query_only() -> None:
    suite = _suite(render_junit(make_query_report()))
    props = _suite_properties(suite)
    assert props["query_only"] == "true"
    assert props["query_budget"] == str(BUDGET) and props["queries_sent"] == "5230"
    assert props["queries_answered"] == "5200"
    assert props["query_failures"] == "3" and props["query_retries"] == "3"
    out = suite.find("system-out")
    assert out is not None and out.text is not None
    assert out.text.startswith(f"query-only audit, budget {BUDGET}: ")
    assert (
        f"through its endpoint {URL} (model unet 3)" in out.text and "5230 queries sent" in out.text
    )
    # every test case of the queried model says it too, failed or passed; the local baseline not
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    worst = cases["c01 worst_case (model)"].find("failure")
    assert worst is not None and f"query-only audit, budget {BUDGET}" in (worst.text or "")
    assert "a fail is proof" in (worst.text or "")
    baseline = cases["c00 random_noise (baseline)"].find("system-out")
    assert baseline is not None and "query-only" not in (baseline.text or "")
    # the counts are unchanged: no test case for the queries
    assert suite.get("tests") == "3" and suite.get("failures") == "2"


def test_an_upload_has_no_query_properties() -> None:
    suite = _suite(render_junit(make_report()))
    props = _suite_properties(suite)
    assert not any("quer" in name for name in props)
    assert suite.find("system-out") is None
    assert "query-only" not in render_junit(make_report())


def test_endpoint_values_are_escaped() -> None:
    hostile = '<script>alert("x")</script>&'
    report = make_query_report(model_name=hostile, endpoint_model=hostile, version="\x00")
    xml = render_junit(report)
    assert "<script>" not in xml and "&lt;script&gt;" in xml
    suite = _suite(xml)  # well-formed, the control character replaced
    out = suite.find("system-out")
    assert out is not None and f"(model {hostile} \ufffd)" in (out.text or "")
    assert _suite_properties(suite)["model_name"] == hostile
