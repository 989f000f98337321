"""JUnit XML: one test case per check result, failures with the measured value and bound."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from schemas.verdicts import compare
from service.reports.junit import render_junit
from tests.service.reports.sample import make_report


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


def test_control_characters_never_break_the_xml() -> None:
    """XML 1.0 forbids most C0 controls, lone surrogates and U+FFFE/U+FFFF: they are replaced
    by U+FFFD, wherever user text lands (attributes and element text alike)."""
    hostile = "net\x00\x01\x0b\x0c\x1f\ud800\ufffe\uffff\tend\n"
    report = make_report(model_name=hostile, description="desc\x01\x0b")
    report["checks"][0]["subject"] = "model\x01"  # lands in a property and in a test case's name
    report["verdict"] = "fail\x08"
    xml = render_junit(report)
    root = ET.fromstring(xml.encode("utf-8"))  # well-formed, and encodable as UTF-8
    suite_props = root.find("testsuite/properties")
    assert suite_props is not None
    props = {p.get("name"): p.get("value") for p in suite_props.iter("property")}
    assert props["model_name"] == "net" + "\ufffd" * 8 + "\tend\n"
    assert props["verdict"] == "fail\ufffd"
    assert any(p.get("value") == "model\ufffd" for p in root.iter("property"))
    assert any("\ufffd" in (case.get("name") or "") for case in root.iter("testcase"))
    # allowed characters, including those outside the BMP, pass through untouched
    fine = render_junit(make_report(model_name="ok \u00e9 \U0001f600 \ue000"))
    names = {p.get("value") for p in ET.fromstring(fine.encode("utf-8")).iter("property")}
    assert "ok \u00e9 \U0001f600 \ue000" in names


def test_failures_name_the_comparisons_the_engine_wrote() -> None:
    """JUnit reads each result's comparisons: a second failed comparison is in the message, a
    passed one only in the text and the properties, and nothing is recomputed from the levels."""
    report = make_report()
    worst = report["checks"][2]
    worst["comparisons"] = [
        *worst["comparisons"],
        compare("empirical Lipschitz lower bound", 1.7, 4.0),
        compare("outputs that were NaN or infinite", 2, 0),
    ]
    worst["levels"][-1]["relative_error"]["max"] = 0.1  # the levels do not decide: the check did
    root = ET.fromstring(render_junit(report))
    case = next(c for c in root.iter("testcase") if c.get("name") == "c01 worst_case (model)")
    failure = case.find("failure")
    assert failure is not None
    message = failure.get("message", "")
    assert "relative error at level 0.05: measured 0.9 > bound 0.4" in message
    assert "outputs that were NaN or infinite: measured 2 > bound 0" in message
    assert "Lipschitz" not in message and "measured 1.7 ≤ bound 4" in (failure.text or "")
    values = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert values["bound: outputs that were NaN or infinite"] == "0"


def test_a_lower_bound_reads_at_least() -> None:
    report = make_report()
    report["checks"][1]["comparisons"] = [
        compare("robust accuracy at ε = 0.1", 0.6, 0.5, "at_least")
    ]
    root = ET.fromstring(render_junit(report))
    case = next(c for c in root.iter("testcase") if c.get("name") == "c00 random_noise (baseline)")
    assert "measured 0.6 ≥ bound 0.5" in (case.findtext("system-out") or "")
