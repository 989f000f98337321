"""`adversarial`: exact robust accuracy of a linear classifier, AutoAttack through Tightrope
against pyautoattack called directly, and a whole classifier audit from a TorchScript file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pyautoattack import AutoAttack

from schemas.audits import AuditConfig
from schemas.checks_classifier import AdversarialCheck
from schemas.model_spec import ModelSpec
from schemas.reports import Report
from tests.engine.classifier_fixtures import context, gaps, linear_case, spec, subject
from tests.fixtures import model_factory
from workers.engine.checks.adversarial import Adversarial
from workers.engine.entry_points import run_audit

KIND = Adversarial()


def run_check(
    check: AdversarialCheck,
    model: torch.nn.Module,
    model_spec: ModelSpec,
    x: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 3,
) -> dict[str, Any]:
    ctx = context(x, labels)
    shard = KIND.run(check, ctx, subject(model, model_spec), range(len(x)), seed)
    return KIND.merge(check, [shard])


@pytest.mark.parametrize(
    ("norm", "attack", "value_range"),
    [
        ("linf", "apgd", (0.0, 1.0)),
        ("l2", "apgd", (-1.0, 1.0)),
        ("linf", "pgd", (0.0, 1.0)),
        ("l2", "pgd", (0.0, 2.0)),
    ],
)
def test_linear_classifier_robust_accuracy_is_exact(
    norm: str, attack: str, value_range: tuple[float, float]
) -> None:
    model, x, labels = linear_case(value_range=value_range)
    f = model.f(x)
    correct = (f > 0).long() == labels
    dual = float(model.w.abs().sum() if norm == "linf" else model.w.norm())
    thresholds = (f.abs() / dual)[correct].tolist()
    # small enough that the value range never clips the optimal perturbation
    limit = 0.25 * (value_range[1] - value_range[0])
    epsilons = gaps([t for t in thresholds if t < limit], 3)
    assert len(epsilons) == 3
    check = AdversarialCheck.model_validate(
        {"norm": norm, "attack": attack, "epsilons": epsilons, "steps": 40, "restarts": 2}
    )
    result = run_check(check, model, spec(2, value_range), x, labels)
    assert result["clean_accuracy"] == float(correct.float().mean())
    for level, eps in zip(result["levels"], epsilons, strict=True):
        expected = sum(1 for t in thresholds if t > eps) / len(x)
        assert level["robust_accuracy"] == pytest.approx(expected, abs=1e-12), level
        assert sum(level["broken_by"].values()) == int(correct.sum()) - level["robust"]
    broken = [image for image in result["per_image"] if image["broken_at"] is not None]
    assert all(image["clean_correct"] and image["broken_by"] == attack for image in broken)


def test_threshold_gives_the_verdict() -> None:
    model, x, labels = linear_case()
    f = model.f(x)
    thresholds = (f.abs() / model.w.abs().sum())[(f > 0).long() == labels]
    expected = float((thresholds > 0.01).sum()) / len(x)  # the exact robust accuracy

    def verdict(bound: float) -> str:
        check = AdversarialCheck.model_validate(
            {
                "epsilons": [0.005, 0.01],
                "steps": 20,
                "threshold": {"min_robust_accuracy": bound, "at_epsilon": 0.01},
            }
        )
        return str(run_check(check, model, spec(), x, labels)["verdict"])

    assert verdict(expected) == "pass"
    assert verdict(expected + 0.01) == "fail"


class TenClasses(torch.nn.Module):
    """A small nonlinear 10-class classifier with seeded weights (AutoAttack's standard version
    expects 10 classes: 9 target classes)."""

    def __init__(self, probabilities: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.hidden = torch.nn.Parameter(torch.randn(16, 12, generator=gen) / 4)
        self.out = torch.nn.Parameter(torch.randn(12, 10, generator=gen) / 2)
        self.probabilities = probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.tanh(x.flatten(1) @ self.hidden) @ self.out * 4
        return logits.softmax(dim=1) if self.probabilities else logits


def ten_class_data(count: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand((count, 1, 4, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        labels = TenClasses()(x).argmax(dim=1)
    return x, labels


def test_autoattack_matches_the_library_called_directly() -> None:
    model = TenClasses().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x, labels = ten_class_data()
    eps, seed = 0.15, 7
    check = AdversarialCheck.model_validate({"attack": "autoattack", "epsilons": [eps]})
    result = run_check(check, model, spec(10), x, labels, seed=seed)

    direct = AutoAttack(model, norm="Linf", eps=eps, seed=seed, version="standard")
    adversarial, _ = direct.run_standard_evaluation(x, labels, batch_size=len(x))
    with torch.no_grad():
        robust = int((model(adversarial).argmax(dim=1) == labels).sum()) / len(x)
    assert result["levels"][0]["robust_accuracy"] == robust
    assert 0.0 < robust < 1.0  # the case exercises both outcomes
    named = set(result["levels"][0]["broken_by"])
    assert named and named <= {"apgd-ce", "apgd-t", "fab-t", "square"}


def test_autoattack_sanity_flags_become_warnings() -> None:
    model = TenClasses(probabilities=True).eval()
    x, labels = ten_class_data(2)
    check = AdversarialCheck.model_validate({"attack": "autoattack", "epsilons": [0.5]})
    result = run_check(check, model, spec(10), x, labels)
    assert any("probability distribution" in w for w in result["warnings"]), result["warnings"]


def test_classifier_audit_from_a_torchscript_file(tmp_path: Path) -> None:
    """The whole path: TorchScript file, an .npz with images and labels, no operator."""
    model_path = model_factory.tiny_classifier_torchscript(tmp_path / "clf.pt", num_classes=3)
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 1.0, size=(6, 1, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]))
    config = AuditConfig.model_validate(
        {
            "dataset": {"file": "data.npz"},
            "checks": [
                {"kind": "adversarial", "epsilons": [0.01, 0.1], "steps": 5},
                {"kind": "minimal_perturbation", "steps": 10},
                {"kind": "universal", "steps": 5, "epsilon": 0.1},
                {"kind": "random_noise", "levels": [0.1], "samples": 3},
            ],
            "device": "cpu",
            "budget": {"images_per_shard": 4},
        }
    )
    out = tmp_path / "out"
    report = run_audit(
        model_path,
        "torchscript",
        ModelSpec.model_validate(model_factory.classifier_spec(num_classes=3)),
        config,
        out_dir=out,
        model_sha256="cd" * 32,
        base_dir=tmp_path,
    )
    Report.model_validate(report)
    assert json.loads((out / "report.json").read_text())["verdict"] == "info"
    kinds = [check["kind"] for check in report["checks"]]
    assert kinds == ["adversarial", "minimal_perturbation", "universal", "random_noise"]
    universal = report["checks"][2]
    assert sorted(universal["artifacts"]) == ["c02-model-universal.npy", "c02-model-universal.png"]
    assert np.load(out / "c02-model-universal.npy").shape == (1, 16, 16)
    assert (out / "c02-model-universal.png").read_bytes()[:4] == b"\x89PNG"
    assert report["checks"][0]["images"] == report["checks"][3]["images"] == 6
    assert report["cost"]["backward_passes"] > 0
