"""compare_with between two audits of a sampler (issue 26): the hallucination probability of
false_positive is one more regression figure, judged by the check's max_regression; against a
deterministic reference (which has none) it is left out. Torch-free."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.audits import AuditConfig, strip_unset_regressions
from schemas.comparisons import HALLUCINATION, comparison_section, headline_figures
from schemas.verdicts import report_verdict

CONFIG = AuditConfig.model_validate(
    {
        "dataset": {"builtin": "ellipses", "count": 3, "size": 16, "seed": 1},
        "operator": {"kind": "denoising"},
        "checks": [
            {
                "kind": "false_positive",
                "threshold": {"max_spurious_contrast": 1.0, "max_regression": 0.5},
            }
        ],
    }
)


def result(subject: str, contrast: float, attacked_high: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "false_positive",
        "subject": subject,
        "verdict": "info",
        "spurious_contrast": {"mean": contrast / 2, "max": contrast},
    }
    if attacked_high is not None:  # a sampler's result
        out["hallucination"] = {
            "clean": {"count": 1, "trials": 96, "estimate": 0.01, "ci_low": 0, "ci_high": 0.05},
            "attacked": {"count": 10, "trials": 96, "estimate": 0.1, "ci_low": 0.05,
                         "ci_high": attacked_high},
        }  # fmt: skip
    return out


def test_the_hallucination_probability_is_a_headline_figure_of_a_sampler() -> None:
    figures = headline_figures(result("model", 0.2, 0.3))
    assert (HALLUCINATION, None, 0.3, "at_most") in figures
    assert all(
        quantity != HALLUCINATION for quantity, *_ in headline_figures(result("m", 0.2, None))
    )


@pytest.mark.parametrize(("new", "passed"), [(0.4, True), (0.5, False)])
def test_a_regression_in_hallucination_probability_is_judged_by_max_regression(
    new: float, passed: bool
) -> None:
    section = comparison_section(
        CONFIG.checks, [result("model", 0.2, new), result("reference", 0.2, 0.3)], {"name": "old"}
    )
    (check,) = section["checks"]
    figure = next(f for f in check["figures"] if f["quantity"] == HALLUCINATION)
    assert figure["model"] == new and figure["reference"] == 0.3
    assert figure["regression"] == pytest.approx((new - 0.3) / 0.3)
    assert figure["max_regression"] == 0.5 and figure["passed"] is passed
    assert section["verdict"] == ("pass" if passed else "fail")
    assert report_verdict([], section) == ("pass" if passed else "fail")


def test_against_a_deterministic_reference_the_probability_is_left_out() -> None:
    section = comparison_section(
        CONFIG.checks, [result("model", 0.2, 0.9), result("reference", 0.2, None)], {"name": "old"}
    )
    (check,) = section["checks"]
    assert [f["quantity"] for f in check["figures"]] == ["largest spurious contrast"]
    assert section["verdict"] == "pass"


def test_the_model_comparisons_count_in_the_audit_verdict() -> None:
    failed = [{"quantity": "noise floor (upper 95 % bound)", "passed": False}]
    assert report_verdict([{"verdict": "pass", "subject": "model"}], None, failed) == "fail"
    assert report_verdict([{"verdict": "info", "subject": "model"}], None, None) == "info"


def test_a_config_without_sampler_threshold_dumps_as_before() -> None:
    dumped = strip_unset_regressions(CONFIG.model_dump(mode="json", by_alias=True))
    assert "sampler_threshold" not in dumped
    bounded = AuditConfig.model_validate(
        {**CONFIG.model_dump(by_alias=True), "sampler_threshold": {"max_noise_floor": 0.5}}
    )
    kept = strip_unset_regressions(bounded.model_dump(mode="json", by_alias=True))
    assert kept["sampler_threshold"] == {"max_noise_floor": 0.5}
    with pytest.raises(ValueError):
        AuditConfig.model_validate(
            {**CONFIG.model_dump(by_alias=True), "sampler_threshold": {"max_noise_floor": 0}}
        )
