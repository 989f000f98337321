"""Findings of classifier checks: a lower bound (robust accuracy) reads `measured < bound` when
it fails, in JUnit too, with the value the engine measured."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from schemas.checks_classifier import AdversarialCheck
from service.reports.findings import findings
from service.reports.junit import render_junit
from tests.engine.classifier_fixtures import context, linear_case, spec, subject
from workers.engine.checks.adversarial import AdversarialRunner


def _report(check: AdversarialCheck, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "verdict": result["verdict"],
        "model": {"name": "linear", "sha256": "ab" * 32},
        "config": {"checks": [check.model_dump(mode="json", by_alias=True)]},
        "checks": [{**result, "kind": "adversarial", "subject": "model"}],
    }


def test_robust_accuracy_below_its_bound_fails_with_the_measured_value() -> None:
    model, x, labels = linear_case()
    runner = AdversarialRunner()
    check = AdversarialCheck.model_validate(
        {
            "norm": "linf",
            "attack": "pgd",
            "epsilons": [0.01, 0.05],
            "steps": 20,
            "threshold": {"min_robust_accuracy": 0.99, "at_epsilon": 0.05},
        }
    )
    shard = runner.run(check, context(x, labels), subject(model, spec(2)), range(len(x)), 0)
    result = runner.merge(check, [shard])
    assert result["verdict"] == "fail"  # 3 labels are wrong: accuracy is below 0.99 anyway

    (finding,) = findings(_report(check, result))
    (comparison,) = finding.comparisons
    assert comparison.at_least and not comparison.passed and comparison.relation == "<"
    assert comparison.measured == result["levels"][1]["robust_accuracy"]
    assert comparison.bound == 0.99
    assert "ε = 0.05" in finding.sentence

    failure = ET.fromstring(render_junit(_report(check, result))).find(".//failure")
    assert failure is not None
    assert "< bound 0.99" in failure.get("message", "")


def _finding(kind: str, config: dict[str, Any], result: dict[str, Any]) -> Any:
    report = {
        "verdict": result["verdict"],
        "model": {"name": "m", "sha256": "ab" * 32},
        "config": {"checks": [{"kind": kind, **config}]},
        "checks": [{**result, "kind": kind, "subject": "model"}],
    }
    (finding,) = findings(report)
    return finding


def test_an_infinite_median_norm_is_said_and_follows_the_verdict() -> None:
    """More than half the inputs without an adversarial point: the median is +∞ (null in JSON)
    and the comparison takes the check's verdict (fail closed by default)."""
    config = {"threshold": {"min_median_norm": 0.5}}
    for verdict in ("fail", "pass"):
        result = {
            "verdict": verdict,
            "attack": "fmn",
            "norm": "l2",
            "norms": {"median": None, "q10": 0.3},
            "not_found": 3,
        }
        finding = _finding("minimal_perturbation", config, result)
        assert "+∞" in finding.sentence
        (comparison,) = finding.comparisons
        assert comparison.passed is (verdict == "pass") and comparison.measured is None


def test_the_worst_case_sentence_names_its_optimiser_and_steps() -> None:
    row = {
        "level": 0.05,
        "relative_error": {"max": 0.3},
        "gaussian_relative_error": {"max": 0.06},
        "worst_image": {"index": 2, "relative_error": 0.3, "optimizer": "pgd", "steps": 70},
    }
    result = {
        "verdict": "info",
        "space": "measurement",
        "clean_relative_error": {"max": 0.05},
        "levels": [row],
    }
    finding = _finding("worst_case", {}, result)
    assert "found by pgd in 70 steps" in finding.sentence
    assert "random noise of the same size" in finding.sentence
