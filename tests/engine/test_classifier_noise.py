"""`random_noise` on a classifier: accuracy per level, with inputs clipped to the value range."""

from __future__ import annotations

import pytest
import torch

from schemas.checks import RandomNoiseCheck
from tests.engine.classifier_fixtures import context, linear_case, spec, subject
from workers.engine.checks.random_noise import RandomNoise

KIND = RandomNoise()


class BrightnessAbove(torch.nn.Module):
    """Class 1 iff some pixel exceeds `limit`: with the value range [0, 1] and limit 1, only an
    unclipped input could ever be class 1."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        excess = x.flatten(1).amax(dim=1) - self.limit
        return torch.stack([torch.zeros_like(excess), excess * 1e6], dim=1)


def run(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, **check: object) -> dict:
    config = RandomNoiseCheck.model_validate(check)
    ctx = context(x, labels)
    classifier = subject(model, spec())
    shards = [KIND.run(config, ctx, classifier, part, 9) for part in ([0, 1, 2], range(3, len(x)))]
    return KIND.merge(config, shards)


def test_noise_is_clipped_to_the_value_range() -> None:
    x = torch.full((5, 1, 4, 4), 0.99)
    labels = torch.tensor([0, 0, 0, 1, 1])
    result = run(BrightnessAbove(1.0), x, labels, levels=[0.5, 2.0], samples=7)
    assert result["clean_accuracy"] == 0.6
    for level in result["levels"]:  # clipped: never class 1, whatever the noise
        assert level["accuracy"] == 0.6 and level["failures"] == 2 * 7
        assert level["flip_probability"]["estimate"] == 0.0
        assert level["trials"] == 35
    # a limit inside the range is reached: the noise is there, only clipped
    unclipped = run(BrightnessAbove(0.995), x, labels, levels=[0.5], samples=7)
    assert unclipped["levels"][0]["flip_probability"]["estimate"] == 1.0


def test_small_noise_keeps_a_linear_classifiers_decisions() -> None:
    """‖e‖ = δ‖x‖ moves f by at most ‖w‖δ‖x‖: below every margin nothing can change."""
    model, x, labels = linear_case()
    f = model.f(x)
    bound = float((f.abs() / (model.w.norm() * x.flatten(1).norm(dim=1))).min())
    result = run(model, x, labels, levels=[bound * 0.9, 0.5], samples=10)
    clean = float(((f > 0).long() == labels).float().mean())
    small, large = result["levels"]
    assert small["accuracy"] == pytest.approx(clean, abs=1e-12)
    assert small["flip_probability"]["estimate"] == 0.0
    assert large["flip_probability"]["estimate"] > 0.0
    assert small["failure_probability"]["ci_low"] <= small["failure_probability"]["estimate"]


def test_threshold_on_the_failure_probability() -> None:
    model, x, labels = linear_case()
    for bound, verdict in ((0.5, "pass"), (0.05, "fail")):  # 3 of 24 wrong: ≥ 12.5 % fail
        result = run(
            model,
            x,
            labels,
            levels=[1e-4],
            samples=4,
            threshold={"max_failure_probability": bound},
        )
        assert result["verdict"] == verdict and result["verdict_level"] == 1e-4
