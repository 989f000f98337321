"""compare_with: the reference model audited beside the model on the same images, draws and
seeds, and the report's `comparison` judging each figure against max_regression."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.canonical import canonical_json
from schemas.comparisons import spec_problems
from schemas.reports import Report
from schemas.verdicts import compare_regression
from tests.engine.tiny_models import Identity, config, spec
from workers.engine.audit import Reference, plan_audit, run_audit_with_model
from workers.shared.errors import EngineInputError

SPEC = spec((1, 16, 16), "image")
CHECKS = [
    {"kind": "random_noise", "levels": [0.05, 0.2], "samples": 3, "failure_error": 0.1},
    {
        "kind": "false_negative",
        "lesion": {"shape": "disk", "size": 1, "contrast": 0.05},
        "placements": 3,
        "panels": 1,
        "threshold": {"max_miss_rate": 1.0, "max_regression": 0.1},
    },
]
CONFIG = config(
    checks=CHECKS,
    dataset={"builtin": "ellipses", "count": 2, "size": 16, "seed": 1},
    noise_level=0.01,
    seed=5,
)


class Blurred(torch.nn.Module):
    """A model followed by a Gaussian blur (σ = 1.5 pixels, 5×5): a worse copy of it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        grid = torch.arange(5, dtype=torch.float32) - 2
        kernel = torch.exp(-(grid**2) / (2 * 1.5**2))
        kernel = torch.outer(kernel, kernel)
        self.register_buffer("kernel", (kernel / kernel.sum()).view(1, 1, 5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(self.model(x), self.kernel, padding=2)


def _reference(model: torch.nn.Module) -> Reference:
    identity = {"id": "mdl_old", "name": "old", "sha256": "cd" * 32, "format": "eager"}
    return Reference(model=model, spec=SPEC, identity={**identity, "spec": SPEC.model_dump()})


def _run(tmp_path: Path, model: torch.nn.Module, reference: Reference | None) -> dict[str, Any]:
    return run_audit_with_model(
        model, SPEC, CONFIG, out_dir=tmp_path, model_sha256="ab" * 32, reference=reference
    )


def test_a_model_compared_with_itself_shows_no_difference_and_passes(tmp_path: Path) -> None:
    report = _run(tmp_path, Identity(), _reference(Identity()))
    Report.model_validate(report)
    assert [(c["kind"], c["subject"]) for c in report["checks"]] == [
        ("random_noise", "model"),
        ("random_noise", "reference"),
        ("false_negative", "model"),
        ("false_negative", "reference"),
    ]
    comparison = report["comparison"]
    assert comparison["reference"]["id"] == "mdl_old"
    assert [c["max_regression"] for c in comparison["checks"]] == [0.05, 0.1]  # default, set
    figures = [f for c in comparison["checks"] for f in c["figures"]]
    assert len(figures) == 3  # random_noise per level, false_negative's miss rate
    assert [f["level"] for f in figures[:2]] == [0.05, 0.2]
    assert all(f["difference"] == 0.0 and f["regression"] == 0.0 for f in figures)
    assert all(f["passed"] for f in figures)
    assert comparison["verdict"] == "pass" and report["verdict"] == "pass"
    assert "c02-reference-false_negative" not in " ".join(report["checks"][3]["artifacts"])


def test_a_blurred_copy_is_a_regression_on_false_negatives(tmp_path: Path) -> None:
    reference = Identity()
    report = _run(tmp_path, Blurred(reference), _reference(reference))
    by_kind = {c["kind"]: c for c in report["comparison"]["checks"]}
    (miss_rate,) = by_kind["false_negative"]["figures"]
    assert miss_rate["reference"] == 0.0 and miss_rate["model"] > 0.5
    assert miss_rate["regression"] > 0.1 and not miss_rate["passed"]
    assert by_kind["false_negative"]["verdict"] == "fail"
    assert report["comparison"]["verdict"] == "fail"
    # the model's own threshold (miss rate ≤ 1) passes: the regression alone fails the audit
    assert report["checks"][2]["verdict"] == "pass"
    assert report["verdict"] == "fail"


def test_identical_seeds_give_identical_figures_for_the_shared_subject(tmp_path: Path) -> None:
    alone = _run(tmp_path / "alone", Identity(), None)
    compared = _run(tmp_path / "compared", Identity(), _reference(Blurred(Identity())))
    assert "comparison" not in alone
    model_checks = [c for c in compared["checks"] if c["subject"] == "model"]
    assert canonical_json(model_checks) == canonical_json(alone["checks"])
    # the reference's draws are the model's: the same noise gives the same figures for itself
    assert compared["config"] == alone["config"]
    shards = plan_audit(SPEC, CONFIG, None, compare=True)
    model_shards = [s for s in shards if s.subject == "model"]
    reference_shards = [s for s in shards if s.subject == "reference"]
    assert [s.seed_key for s in model_shards] == [s.seed_key for s in reference_shards]


def test_a_reference_of_another_shape_is_refused(tmp_path: Path) -> None:
    other = spec((1, 8, 8), "image")
    assert spec_problems(SPEC, other) and not spec_problems(SPEC, SPEC)
    with pytest.raises(EngineInputError, match="image_shape"):
        _run(tmp_path, Identity(), Reference(Identity(), other, {}))


@pytest.mark.parametrize(
    ("new", "old", "direction", "regression", "passed"),
    [
        (0.105, 0.1, "at_most", 0.05, True),
        (0.106, 0.1, "at_most", 0.06, False),
        (0.09, 0.1, "at_most", -0.1, True),
        (0.8, 1.0, "at_least", 0.2, False),
        (0.0, 0.0, "at_most", 0.0, True),
    ],
)
def test_regression_is_relative_in_the_worse_direction(
    new: float, old: float, direction: str, regression: float, passed: bool
) -> None:
    row = compare_regression("q", None, new, old, 0.05 + 1e-9, direction)
    assert row["regression"] == pytest.approx(regression)
    assert row["passed"] is passed


def test_a_figure_missing_from_one_model_does_not_pass() -> None:
    assert not compare_regression("q", None, None, 0.1, 0.05)["passed"]
    assert not compare_regression("q", None, 0.1, None, 0.05)["passed"]
    assert compare_regression("q", None, None, None, 0.05)["passed"]
