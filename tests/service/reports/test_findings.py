"""Findings: the sentences people read, next to the comparisons the engine's checks wrote. A
lower bound (robust accuracy) reads `measured < bound` when it fails, in JUnit too, with the
value the engine measured; findings never compare a value with a bound themselves."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from schemas.checks_classifier import AdversarialCheck, MinimalPerturbationCheck
from schemas.verdicts import compare
from service.reports.findings import findings
from service.reports.junit import render_junit
from tests.engine.classifier_fixtures import context, linear_case, spec, subject
from workers.engine.checks.adversarial import Adversarial
from workers.engine.checks.minimal_perturbation import MinimalPerturbation


def _report(check: AdversarialCheck, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "verdict": result["verdict"],
        "model": {"name": "linear", "sha256": "ab" * 32},
        "config": {"checks": [check.model_dump(mode="json", by_alias=True)]},
        "checks": [{**result, "kind": "adversarial", "subject": "model"}],
    }


def test_robust_accuracy_below_its_bound_fails_with_the_measured_value() -> None:
    model, x, labels = linear_case()
    adversarial = Adversarial()
    check = AdversarialCheck.model_validate(
        {
            "norm": "linf",
            "attack": "pgd",
            "epsilons": [0.01, 0.05],
            "steps": 20,
            "threshold": {"min_robust_accuracy": 0.99, "at_epsilon": 0.05},
        }
    )
    shard = adversarial.run(check, context(x, labels), subject(model, spec(2)), range(len(x)), 0)
    result = adversarial.merge(check, [shard])
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
    and the check's comparison fails closed unless the threshold says `unmeasured_median`."""
    images = [{"index": i, "norm": n, "found_by": "fmn"} for i, n in enumerate([0.2, None, None])]
    for unmeasured in ("fail", "pass"):
        threshold = {"min_median_norm": 0.5, "unmeasured_median": unmeasured}
        check = MinimalPerturbationCheck.model_validate({"steps": 5, "threshold": threshold})
        result = MinimalPerturbation().merge(check, [{"images": images}])
        assert result["verdict"] == unmeasured
        config = check.model_dump(mode="json", by_alias=True)
        config.pop("kind")
        finding = _finding("minimal_perturbation", config, result)
        assert "+∞" in finding.sentence and finding.verdict == unmeasured
        (comparison,) = finding.comparisons
        assert comparison.passed is (unmeasured == "pass") and comparison.measured is None
        assert comparison.at_least


def test_the_minimal_norm_sentence_says_which_attack_found_the_points() -> None:
    """The ensemble's count per attack (`found_by`) is said; a result without it says nothing."""
    images = [
        {"index": i, "norm": n, "found_by": by}
        for i, (n, by) in enumerate([(0.2, "fmn"), (0.3, "deepfool"), (0.4, "fmn"), (0.0, None)])
    ]
    check = MinimalPerturbationCheck()
    result = MinimalPerturbation().merge(check, [{"images": images}])
    finding = _finding("minimal_perturbation", {}, result)
    assert finding.sentence.endswith("; found by fmn 2, deepfool 1.")
    result.pop("found_by")
    assert "found by" not in _finding("minimal_perturbation", {}, result).sentence


def test_findings_read_the_comparisons_and_never_recompute_them() -> None:
    """A result's comparisons are shown as written, even where its numbers would say otherwise:
    the check decided; a sentence is all findings add."""
    written = compare("largest Jacobian spectral norm", 2.0, 3.0) | {"passed": False}
    result = {
        "verdict": "fail",
        "jacobian_norm": {"mean": 1.0, "max": 2.0},
        "comparisons": [written],
    }
    finding = _finding("lipschitz", {"threshold": {"max_jacobian_norm": 3.0}}, result)
    (comparison,) = finding.comparisons
    assert (comparison.measured, comparison.bound, comparison.passed) == (2.0, 3.0, False)
    assert comparison.relation == ">" and not comparison.at_least
    assert "2 at most" in finding.sentence


def test_a_result_without_comparisons_has_none() -> None:
    """A report written before `comparisons` existed: its verdict stands, no bound is made up."""
    result = {"verdict": "fail", "jacobian_norm": {"mean": 1.0, "max": 9.0}}
    finding = _finding("lipschitz", {"threshold": {"max_jacobian_norm": 3.0}}, result)
    assert finding.comparisons == [] and finding.verdict == "fail" and finding.has_threshold


def test_an_unknown_kind_gets_a_plain_sentence_and_its_comparisons() -> None:
    result = {"verdict": "pass", "comparisons": [compare("novelty", 1.0, 2.0)]}
    finding = _finding("novel_check", {}, result)
    assert "novel_check: verdict pass" in finding.sentence
    assert [c.quantity for c in finding.comparisons] == ["novelty"]


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
