"""`minimal_perturbation`: on a linear classifier the smallest adversarial perturbation is
known exactly, |w·x + b| / ‖w‖_* (‖w‖₂ for ℓ2, ‖w‖₁ for ℓ∞)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from schemas.checks_classifier import MinimalPerturbationCheck
from tests.engine.classifier_fixtures import context, linear_case, spec, subject
from workers.engine.checks.minimal_perturbation import MinimalPerturbationRunner

RUNNER = MinimalPerturbationRunner()


def run(
    check: dict[str, Any], value_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    model, x, labels = linear_case(count=12, value_range=value_range, one_side=True)
    config = MinimalPerturbationCheck.model_validate(check)
    ctx = context(x, labels)
    shard = RUNNER.run(config, ctx, subject(model, spec(2, value_range)), range(len(x)), 0)
    f = model.f(x)
    return RUNNER.merge(config, [shard]), f, (f > 0).long() == labels


@pytest.mark.parametrize(
    ("attack", "norm", "value_range"),
    [("ddn", "l2", (0.0, 1.0)), ("ddn", "l2", (-1.0, 1.0)), ("fmn", "linf", (0.0, 1.0))],
)
def test_linear_minimal_norm_within_one_percent(
    attack: str, norm: str, value_range: tuple[float, float]
) -> None:
    result, f, correct = run({"attack": attack, "norm": norm, "steps": 200}, value_range)
    dual = _dual(norm, value_range)
    for image, right, margin in zip(result["per_image"], correct, f, strict=True):
        if not right:
            assert image["norm"] == 0.0  # misclassified already
            continue
        assert image["norm"] == pytest.approx(float(margin.abs()) / dual, rel=0.01), image


def test_fmn_l2_is_exact_where_it_leaves_the_boundary() -> None:
    """FMN ℓ2 steps exactly onto a linear boundary, where float rounding decides whether the
    point is adversarial; where it is, the norm is exact within 1 %."""
    result, f, correct = run({"attack": "fmn", "norm": "l2", "steps": 200})
    dual = _dual("l2", (0.0, 1.0))
    found = 0
    for image, right, margin in zip(result["per_image"], correct, f, strict=True):
        if right and image["norm"] is not None:
            found += 1
            assert image["norm"] == pytest.approx(float(margin.abs()) / dual, rel=0.01)
    assert found >= 0.75 * int(correct.sum())


def _dual(norm: str, value_range: tuple[float, float]) -> float:
    w = linear_case(count=12, value_range=value_range, one_side=True)[0].w
    return float(w.norm() if norm == "l2" else w.abs().sum())


def test_deepfool_overshoots_the_exact_norm_a_little() -> None:
    """DeepFool steps past the boundary by its overshoot (2 % per step): an upper bound."""
    result, f, correct = run({"attack": "deepfool", "norm": "l2", "steps": 50})
    w = linear_case(count=12, one_side=True)[0].w
    for image, right, margin in zip(result["per_image"], correct, f, strict=True):
        if right:
            exact = float(margin.abs() / w.norm())
            assert exact <= image["norm"] <= exact * 1.1


def test_summary_and_the_implied_accuracy_curve() -> None:
    result, f, correct = run({"attack": "ddn", "steps": 100, "epsilons": [1e-6, 0.05, 10.0]})
    norms = [image["norm"] for image in result["per_image"]]
    assert result["clean_accuracy"] == float(correct.float().mean())
    assert result["norms"]["median"] == pytest.approx(float(torch.tensor(norms).median()), rel=0.2)
    assert result["norms"]["q10"] <= result["norms"]["median"] <= result["norms"]["q90"]
    curve = {point["epsilon"]: point["accuracy"] for point in result["accuracy_curve"]}
    assert curve[1e-6] == result["clean_accuracy"]
    assert curve[0.05] == sum(1 for n in norms if n > 0.05) / len(norms)
    assert curve[10.0] == 0.0
    assert result["not_found"] == 0 and result["verdict"] == "info"


def test_threshold_on_the_median() -> None:
    check = {"attack": "fmn", "steps": 50}
    median = run(check)[0]["norms"]["median"]
    low = run({**check, "threshold": {"min_median_norm": median * 0.9}})[0]
    high = run({**check, "threshold": {"min_median_norm": median * 1.1}})[0]
    assert (low["verdict"], high["verdict"]) == ("pass", "fail")


def test_ddn_refuses_linf() -> None:
    with pytest.raises(ValueError, match="l2 norm only"):
        MinimalPerturbationCheck.model_validate({"attack": "ddn", "norm": "linf"})
