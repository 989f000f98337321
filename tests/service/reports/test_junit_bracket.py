"""JUnit of a worst_case check with `certify`: the bracket per level in the test case's text,
the proof in its properties; `proven` passes, `unproven` fails under policy fail."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from service.reports.junit import render_junit
from tests.service.reports.bracket_sample import certified_report
from tests.service.reports.sample import make_report


def _case(report: dict) -> ET.Element:
    root = ET.fromstring(render_junit(report))
    (case,) = [c for c in root.iter("testcase") if "worst_case" in c.get("name", "")]
    return case


def _properties(case: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in case.iter("property")}


def test_a_proven_check_passes_and_shows_its_bracket() -> None:
    case = _case(certified_report(3.0))
    assert case.find("failure") is None
    text = case.findtext("system-out") or ""
    assert "bracket at level 0.05: change per unit radius [1, 2.93] (U/L 2.93)" in text
    assert "; proven" in text and "proof: proven" in text
    properties = _properties(case)
    assert properties["verdict"] == "proven" and properties["certified: proof"] == "proven"
    assert properties["certified: upper at level 0.05"] == "2.93"


@pytest.mark.parametrize("policy", ["fail", "pass"])
def test_an_unproven_check_follows_its_policy(policy: str) -> None:
    case = _case(certified_report(2.0, policy))
    failure = case.find("failure")
    text = (failure.text if failure is not None else case.findtext("system-out")) or ""
    assert "not proven" in text and "proof: unproven" in text
    assert f"certify.unproven = '{policy}'" in text
    if policy == "fail":
        assert failure is not None
        assert "certified upper bound" in failure.get("message", "")
    else:
        assert failure is None


def test_a_check_without_certify_has_no_bracket() -> None:
    case = _case(make_report())
    assert "bracket" not in ET.tostring(case, encoding="unicode")
    assert not any(name.startswith("certified") for name in _properties(case))
