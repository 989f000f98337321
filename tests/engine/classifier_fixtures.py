"""Classifiers whose robustness is known exactly, and the context to audit them (engine tests)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from schemas.model_spec import ModelSpec
from schemas.operators import DenoisingOperator
from workers.engine.classifiers import ClassifierSubject, classifier_subject
from workers.engine.context import AuditContext, PassCounter
from workers.engine.operators import build_operator

SHAPE = (1, 4, 4)


class LogitDifference(torch.nn.Module):
    """A 2-class linear classifier in logit-difference form: logits (−f/2, f/2), f = w·x + b.
    Class 1 iff f > 0; the smallest perturbation that flips x has norm |f| / ‖w‖_* (ℓ2: ‖w‖₂,
    ℓ∞: ‖w‖₁), as long as the box does not get in the way."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.register_buffer("w", w.flatten())
        self.b = b

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w + self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.f(x)
        return torch.stack([-f / 2, f / 2], dim=1)


def spec(
    num_classes: int = 2,
    value_range: tuple[float, float] = (0.0, 1.0),
    shape: tuple[int, int, int] = SHAPE,
) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "tiny-classifier",
            "task": "classification",
            "input": "image",
            "image_shape": list(shape),
            "num_classes": num_classes,
            "value_range": list(value_range),
        }
    )


def linear_case(
    count: int = 24,
    seed: int = 0,
    value_range: tuple[float, float] = (0.0, 1.0),
    one_side: bool = False,
) -> tuple[LogitDifference, torch.Tensor, torch.Tensor]:
    """A linear classifier, images well inside the value range (so no box constraint is active
    for the perturbations the tests use), and labels: the true side for most, a few wrong.

    `one_side`: every image on the class-1 side. Minimum-norm attacks stop exactly on the
    boundary, where the two logits tie and argmax picks class 0: only from class 1 is that
    point adversarial (a real network never ties exactly)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE, generator=gen)
    lo, hi = value_range
    unit = 0.35 + 0.3 * torch.rand((count, *SHAPE), generator=gen)
    x = lo + (hi - lo) * unit
    # the boundary halfway between the two middle points: no point sits on it
    middle = (x.flatten(1) @ w.flatten()).sort().values[count // 2 - 1 : count // 2 + 1]
    b = -float(middle.mean())
    if one_side:
        b = 1e-3 - float((x.flatten(1) @ w.flatten()).min())
    model = LogitDifference(w, b)
    labels = (model.f(x) > 0).long()
    labels[:3] = 1 - labels[:3]  # misclassified: never robust
    return model, x, labels


def context(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> AuditContext:
    operator = build_operator(DenoisingOperator(), tuple(images.shape[1:]))  # type: ignore[arg-type]
    return AuditContext(
        operator=operator,
        images=images,
        device=torch.device("cpu"),
        seed=seed,
        noise_level=0.0,
        labels=labels,
    )


def subject(model: torch.nn.Module, model_spec: ModelSpec) -> ClassifierSubject:
    return classifier_subject(model, model_spec, PassCounter())


def gaps(thresholds: Sequence[float], count: int) -> list[float]:
    """`count` epsilons each halfway between two consecutive distinct thresholds, so that no
    point sits within float error of an epsilon."""
    values = sorted(set(thresholds))
    mids = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False) if b - a > 1e-3]
    step = max(1, len(mids) // count)
    return mids[::step][:count]
