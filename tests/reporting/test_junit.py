"""JUnit XML: one test case per check result, failures with the measured value and bound."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from service.junit import render_junit
from tests.reporting.sample import make_report


def test_structure_pass_fail_and_informational() -> None:
    root = ET.fromstring(render_junit(make_report()))
    (suite,) = root.findall("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "2"
    assert suite.get("skipped") == "1" and suite.get("errors") == "0"
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert list(cases) == [
        "c00 random_noise (model)",
        "c00 random_noise (baseline)",
        "c01 worst_case (model)",
        "c02 lipschitz (model)",
    ]
    # random noise, model: ci_high 0.75 at level 0.05 against the bound 0.5
    failure = cases["c00 random_noise (model)"].find("failure")
    assert failure is not None
    message = failure.get("message", "")
    assert "at level 0.05" in message and "measured 0.75 > bound 0.5" in message
    # the baseline passes: no failure, its numbers are still there
    baseline = cases["c00 random_noise (baseline)"]
    assert baseline.find("failure") is None and baseline.find("skipped") is None
    values = {p.get("name"): p.get("value") for p in baseline.iter("property")}
    assert values["measured: failure probability (upper 95 % bound) at level 0.05"] == "0.25"
    assert values["bound: failure probability (upper 95 % bound) at level 0.05"] == "0.5"
    # worst case at the threshold's level 0.05: 0.9 against 0.4
    worst = cases["c01 worst_case (model)"].find("failure")
    assert worst is not None and "measured 0.9 > bound 0.4" in worst.get("message", "")
    # no threshold: skipped, not failed
    assert cases["c02 lipschitz (model)"].find("skipped") is not None
    props = {p.get("name"): p.get("value") for p in suite.find("properties").iter("property")}
    assert props["verdict"] == "fail" and props["model_sha256"] == "ab" * 32


def test_all_pass_has_no_failures() -> None:
    report = make_report()
    report["checks"] = [c for c in report["checks"] if c["verdict"] != "fail"]
    report["checks"][0]["subject"] = "model"  # the baseline result stands alone now
    report["config"]["checks"] = [report["config"]["checks"][0], report["config"]["checks"][2]]
    report["verdict"] = "pass"
    root = ET.fromstring(render_junit(report))
    assert root.get("failures") == "0" and root.get("tests") == "2"


def test_user_text_is_escaped() -> None:
    xml = render_junit(make_report(model_name='<evil a="1">&</evil>'))
    root = ET.fromstring(xml)  # still well-formed
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["model_name"] == '<evil a="1">&</evil>'
