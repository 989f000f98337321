"""Verdicts on a sampler's figures (issue 26, docs/theorem.md "Verdicts on estimated figures"):

- a bound on an estimated figure of the average map (worst_case, lipschitz, false_positive's
  spurious contrast) judges the upper end of its 95 % interval, estimate + t·SE (Student's t with
  K − 1 degrees of freedom), and warns when it lies inside the interval;
- `sampler_threshold.max_noise_floor` judges the upper end of the noise floor's interval, only
  for a stochastic model;
- random_noise gives every perturbation a draw of its own, even from a model that draws once
  per call.

The known-answer model is Ψ(y) = By + σξ with σ_max(B) = 1.5 (test_sampler_known_answers.py):
its average map is B, so the Lipschitz figures are 1.5 with standard error (nearly) 0."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from schemas.audits import AuditConfig
from schemas.model_spec import ModelSpec
from schemas.reports import Report
from tests.engine.test_sampler_known_answers import SIGMA, SPEC, audit, noisy_linear
from tests.engine.tiny_models import Identity, config
from tests.fixtures import model_factory as mf
from workers.engine.audit import SINGLE_DRAW_MEASURES, run_audit_with_model
from workers.engine.sampling import compare_estimate, interval_factor
from workers.reporting.html import render_html

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

TOP = 1.5  # σ_max(B) of noisy_linear


def test_compare_estimate_judges_the_upper_end_and_warns_inside_the_interval() -> None:
    t = interval_factor(8)
    assert t == pytest.approx(2.3646, abs=1e-4)  # Student's t, 7 degrees of freedom
    estimate, error = 1.0, 0.1
    above, warning = compare_estimate("figure", estimate, error, 8, estimate + 2 * t * error)
    assert above["passed"] and warning is None
    assert above["measured"] == pytest.approx(estimate + t * error)
    assert above["estimate"] == estimate and above["standard_error"] == error
    assert above["quantity"] == "figure (upper 95 % bound)"
    # the estimate passes, the interval does not: fail, with a warning naming both
    inside, warning = compare_estimate("figure", estimate, error, 8, estimate + 0.5 * t * error)
    assert not inside["passed"]
    assert warning is not None and "lies inside the 95 % interval" in warning
    assert "estimate is below the bound" in warning and "sampler.replicates" in warning
    below_estimate, warning = compare_estimate(
        "figure", estimate, error, 8, estimate - 0.5 * t * error
    )
    assert not below_estimate["passed"] and warning is not None
    assert "estimate is above the bound" in warning
    far_below, warning = compare_estimate("figure", estimate, error, 8, estimate - 3 * t * error)
    assert not far_below["passed"] and warning is None
    # no standard error (a non-finite replicate): nothing is below the bound
    missing, warning = compare_estimate("figure", estimate, math.nan, 8, 10.0)
    assert not missing["passed"] and missing["measured"] is None and warning is None


@pytest.mark.parametrize(("factor", "verdict"), [(1.01, "pass"), (0.99, "fail")])
def test_lipschitz_bounds_just_above_and_below_sigma_max(
    tmp_path: Path, factor: float, verdict: str
) -> None:
    model, top = noisy_linear(tmp_path)
    assert top == TOP
    checks = [
        {"kind": "lipschitz", "iterations": 10, "threshold": {"max_jacobian_norm": factor * top}},
        {"kind": "worst_case", "levels": [0.05], "steps": 10, "restarts": 1,
         "target": "reconstruction", "threshold": {"max_lipschitz": factor * top}},
    ]  # fmt: skip
    report = audit(model, tmp_path / "out", checks)
    for check in report["checks"]:
        (comparison,) = check["comparisons"]
        assert comparison["quantity"].endswith("(upper 95 % bound)"), check["kind"]
        assert comparison["estimate"] == pytest.approx(top, rel=1e-3), check["kind"]
        # the Jacobian of every draw is B: the figure does not move between replicates
        assert comparison["standard_error"] <= 1e-6, check["kind"]
        assert comparison["measured"] == pytest.approx(
            comparison["estimate"] + interval_factor(8) * comparison["standard_error"]
        )
        assert check["verdict"] == verdict, check["kind"]
        assert not any("lies inside" in w for w in check["warnings"]), check["kind"]
    assert report["verdict"] == verdict


def test_a_bound_inside_the_interval_fails_and_warns(tmp_path: Path) -> None:
    """The worst-case relative error against the ground truth has a standard error (the R-draw
    average keeps σξ/√R of noise): a bound between the estimate and its interval's upper end
    fails with a warning; a bound above the interval passes without one."""
    model, _ = noisy_linear(tmp_path)

    def run(bound: float, name: str) -> dict[str, Any]:
        checks = [
            {"kind": "worst_case", "levels": [0.05], "steps": 3, "restarts": 1,
             "threshold": {"max_relative_error": bound}},
        ]  # fmt: skip
        (check,) = audit(model, tmp_path / name, checks)["checks"]
        return dict(check)

    first = run(10.0, "first")
    estimate = first["levels"][0]["relative_error"]["max"]
    error = first["levels"][0]["standard_error"]["relative_error"]["max"]
    assert error > 0
    half = interval_factor(8) * error
    (comparison,) = first["comparisons"]
    assert comparison["estimate"] == estimate and comparison["standard_error"] == error
    assert comparison["measured"] == pytest.approx(estimate + half)

    inside = run(estimate + 0.5 * half, "inside")
    assert inside["verdict"] == "fail"  # the estimate alone would pass
    (warning,) = [w for w in inside["warnings"] if "lies inside" in w]
    assert "worst-case relative error at level 0.05" in warning
    assert "estimate is below the bound" in warning

    above = run(estimate + 2 * half, "above")
    assert above["verdict"] == "pass"
    assert not any("lies inside" in w for w in above["warnings"])


def test_the_noise_floor_threshold_judges_the_upper_end_of_its_interval(tmp_path: Path) -> None:
    model, _ = noisy_linear(tmp_path)
    exact = SIGMA * math.sqrt(256)  # σ√n
    verdicts = {}
    for name, bound in (("loose", 1.2 * exact), ("tight", 0.8 * exact)):
        report = run_audit_with_model(
            model,
            SPEC,
            config(
                seed=3,
                checks=[{"kind": "random_noise", "levels": [0.05], "samples": 2}],
                sampler_threshold={"max_noise_floor": bound},
            ),
            out_dir=tmp_path / name,
            model_sha256="ab" * 32,
        )
        Report.model_validate(report)
        (comparison,) = report["model"]["comparisons"]
        assert comparison["quantity"] == "noise floor (upper 95 % bound)"
        assert comparison["measured"] == report["model"]["noise_floor"]["ci_high"]
        assert comparison["bound"] == bound
        verdicts[name] = (comparison["passed"], report["verdict"])
        assert report["config"]["sampler_threshold"] == {"max_noise_floor": bound}
        page = render_html(report, tmp_path / name)
        assert 'id="model-comparisons"' in page and "noise floor (upper 95 % bound)" in page
    # the check has no threshold (info): the noise floor alone decides the audit
    assert verdicts == {"loose": (True, "pass"), "tight": (False, "fail")}


def test_a_deterministic_model_has_no_noise_floor_to_compare(tmp_path: Path) -> None:
    checks = [{"kind": "random_noise", "levels": [0.05], "samples": 2}]
    plain = run_audit_with_model(
        Identity(), SPEC, config(seed=3, checks=checks), out_dir=tmp_path / "plain",
        model_sha256="ab" * 32,
    )  # fmt: skip
    bounded = run_audit_with_model(
        Identity(), SPEC, config(seed=3, checks=checks, sampler_threshold={"max_noise_floor": 0.1}),
        out_dir=tmp_path / "bounded", model_sha256="ab" * 32,
    )  # fmt: skip
    assert "comparisons" not in bounded["model"] and "noise_floor" not in bounded["model"]
    assert bounded["verdict"] == plain["verdict"] == "info"
    (warning,) = [w for w in bounded["warnings"] if "sampler_threshold" in w]
    assert "not compared" in warning
    # without the field the config dumps as it did before it existed
    assert "sampler_threshold" not in plain["config"]


class OneDrawPerCall(torch.nn.Module):
    """Ψ(y) = y + b·2 with ONE b ~ Bernoulli(1/2) per call, shared by the whole batch."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        shift = (torch.rand(()) < 0.5).to(y.dtype) * 2.0
        return y + shift


def test_random_noise_gives_every_perturbation_a_draw_of_its_own(tmp_path: Path) -> None:
    """Sharing one draw within an image's batch of samples would make every image fail all of
    its 32 samples or none; one call per perturbation makes the failures a binomial count."""
    report = run_audit_with_model(
        OneDrawPerCall(),
        SPEC,
        config(seed=5, checks=[{"kind": "random_noise", "levels": [0.05], "samples": 32}]),
        out_dir=tmp_path / "out",
        model_sha256="ab" * 32,
    )
    assert report["model"]["stochastic"] is True
    (check,) = report["checks"]
    (level,) = check["levels"]
    assert level["trials"] == 3 * 32
    # y = x here (denoising, no noise): a sample fails (error 2/‖x‖ > τ) when its own b = 1,
    # with probability 1/2 per perturbation
    assert level["failures"] % 32 != 0
    assert 0.25 * 96 < level["failures"] < 0.75 * 96
    assert "independent draw" in check["sampler"]["measures"]


class NoisyClassifier(torch.nn.Module):
    """Logits of a fixed linear map plus fresh Gaussian noise on every call: a sampler."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.flatten(1) @ self.weight.t()
        return logits + torch.randn_like(logits)


def test_a_sampling_classifiers_checks_say_what_a_single_draw_means(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 1.0, size=(4, 1, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", images=images, labels=np.array([0, 1, 2, 0]))
    audit_config = AuditConfig.model_validate(
        {
            "dataset": {"file": "data.npz"},
            "checks": [
                {"kind": "adversarial", "epsilons": [0.1], "steps": 2},
                {"kind": "random_noise", "levels": [0.1], "samples": 2},
            ],
            "device": "cpu",
        }
    )
    report = run_audit_with_model(
        NoisyClassifier(),
        ModelSpec.model_validate(mf.classifier_spec(num_classes=3)),
        audit_config,
        out_dir=tmp_path / "out",
        model_sha256="ab" * 32,
        base_dir=tmp_path,
    )
    Report.model_validate(report)
    assert report["model"]["stochastic"] is True and "noise_floor" not in report["model"]
    for check in report["checks"]:
        statement = SINGLE_DRAW_MEASURES[check["kind"]]
        assert check["sampler"] == {"single_draws": True, "measures": statement}
        assert "one call of the model" in statement
        (warning,) = [w for w in check["warnings"] if "is stochastic" in w]
        assert warning.endswith(statement)
