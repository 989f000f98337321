"""JUnit of a sampler's report (issue 26): the noise floor with its interval in the suite's
properties, every check's sampler figures (draws, replicates, standard errors, probabilities
with their intervals) in its test case, the estimate and standard error behind a bound judged
on an interval's end, and the model's own `sampler_threshold` as a test case of its own."""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from typing import Any

from schemas.reports import Report
from schemas.verdicts import compare
from service.reports.junit import render_junit
from tests.service.reports.sample import make_report

FLOOR = {
    "value": 0.8,
    "ci_low": 0.79,
    "ci_high": 0.81,
    "confidence": 0.95,
    "draws_per_input": 32,
    "inputs": 3,
    "definition": "the root-mean-square distance of one draw from the average output",
}


def sampler_report(floor_bound: float = 1.0) -> dict[str, Any]:
    report = make_report()
    report["model"].update(
        stochastic=True,
        output_spread=0.05,
        noise_floor=FLOOR,
        comparisons=[compare("noise floor (upper 95 % bound)", 0.81, floor_bound)],
    )
    lipschitz = next(c for c in report["checks"] if c["kind"] == "lipschitz")
    judged = compare("largest Jacobian spectral norm (upper 95 % bound)", 1.6, 2.0)
    judged.update(estimate=1.5, standard_error=0.0423)
    lipschitz.update(
        comparisons=[judged],
        verdict="pass",
        standard_error={"mean": 0.01, "max": 0.0423},
        sampler={"draws": 8, "replicates": 8, "measures": "the average map's Jacobian norm"},
    )
    report["config"]["checks"][2]["threshold"] = {"max_jacobian_norm": 2.0}
    report["config"]["checks"].append({"kind": "false_positive", "threshold": None})
    report["checks"].append(
        {
            "kind": "false_positive",
            "subject": "model",
            "verdict": "info",
            "comparisons": [],
            "warnings": [],
            "artifacts": [],
            "delta": 0.02,
            "window": 5,
            "images": 3,
            "spurious_contrast": {"mean": 0.1, "max": 0.2},
            "standard_error": {"spurious_contrast": {"mean": 0.001, "max": 0.002}},
            "hallucination": {
                "contrast": 0.1,
                "samples_per_image": 32,
                "clean": {"count": 3, "trials": 96, "estimate": 0.03125, "ci_low": 0.0065,
                          "ci_high": 0.0886},
                "attacked": {"count": 48, "trials": 96, "estimate": 0.5, "ci_low": 0.396,
                             "ci_high": 0.604},
            },
            "sampler": {"draws": 8, "replicates": 8, "samples": 32, "contrast": 0.1,
                        "measures": "the average map and the sampler's single draws"},
        }
    )  # fmt: skip
    Report.model_validate(report)
    return report


def cases(xml: str) -> tuple[ET.Element, dict[str, ET.Element]]:
    (suite,) = ET.fromstring(xml).findall("testsuite")
    return suite, {case.get("name", ""): case for case in suite.findall("testcase")}


def properties(element: ET.Element) -> dict[str, str]:
    found = element.find("properties")
    assert found is not None
    return {p.get("name", ""): p.get("value", "") for p in found.iter("property")}


def test_the_suite_carries_the_noise_floor_with_its_interval() -> None:
    suite, _ = cases(render_junit(sampler_report()))
    props = properties(suite)
    assert props["model_stochastic"] == "true"
    assert props["noise_floor_value"] == "0.8"
    assert props["noise_floor_ci_low"] == "0.79" and props["noise_floor_ci_high"] == "0.81"
    assert props["noise_floor_draws_per_input"] == "32"


def test_a_checks_sampler_figures_are_properties_and_output() -> None:
    _, found = cases(render_junit(sampler_report()))
    lipschitz = found["c02 lipschitz (model)"]
    props = properties(lipschitz)
    assert props["sampler: draws"] == "8" and props["sampler: replicates"] == "8"
    assert props["sampler: standard error of the largest Jacobian spectral norm"] == "0.0423"
    quantity = "largest Jacobian spectral norm (upper 95 % bound)"
    assert props[f"measured: {quantity}"] == "1.6" and props[f"bound: {quantity}"] == "2"
    assert props[f"estimate: {quantity}"] == "1.5"
    assert props[f"standard error: {quantity}"] == "0.0423"
    out = lipschitz.find("system-out")
    assert out is not None and "Of the sampler: the average map's Jacobian norm" in (out.text or "")
    positive = found["c03 false_positive (model)"]
    assert positive.find("skipped") is not None  # no threshold: informational
    props = properties(positive)
    assert props["sampler: hallucination probability (attacked)"] == "0.5"
    assert props["sampler: hallucination probability (attacked) ci_low"] == "0.396"
    assert props["sampler: hallucination probability (attacked) ci_high"] == "0.604"
    assert props["sampler: hallucination probability (clean) trials"] == "96"
    assert props["sampler: standard error of the largest spurious contrast"] == "0.002"
    assert props["sampler: samples"] == "32"
    text = positive.find("system-out")
    assert text is not None and "hallucination probability (attacked) ci_high: 0.604" in (
        text.text or ""
    )


def test_the_noise_floor_threshold_is_a_test_case() -> None:
    suite, found = cases(render_junit(sampler_report(floor_bound=1.0)))
    case = found["model sampler_threshold"]
    assert case.find("failure") is None
    assert suite.get("tests") == "6" and suite.get("failures") == "2"  # the sample's own two
    failing = sampler_report(floor_bound=0.5)
    failing["verdict"] = "fail"
    suite, found = cases(render_junit(failing))
    failure = found["model sampler_threshold"].find("failure")
    assert failure is not None
    assert "noise floor (upper 95 % bound): measured 0.81 > bound 0.5" in failure.get("message", "")
    assert "95 % interval 0.79 to 0.81" in (failure.text or "")
    assert suite.get("failures") == "3"


def test_a_deterministic_report_renders_as_before() -> None:
    plain = make_report()
    again = copy.deepcopy(plain)
    again["model"]["stochastic"] = False
    xml = render_junit(again)
    suite, found = cases(xml)
    assert "model sampler_threshold" not in found
    assert not any(name.startswith("noise_floor") for name in properties(suite))
    assert not any(
        name.startswith(("sampler:", "estimate:", "standard error:"))
        for case in found.values()
        for name in properties(case)
    )
    assert xml == render_junit(plain)
