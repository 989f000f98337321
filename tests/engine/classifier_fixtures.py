"""Classifiers whose robustness is known exactly, and the context to audit them (engine tests)."""

from __future__ import annotations

import math
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


class LinearClassifier(torch.nn.Module):
    """K-class linear classifier, logits W x + b (x flattened)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def low_ranked_nearest(
    classes: int,
    value_range: tuple[float, float] = (0.0, 1.0),
    count: int = 8,
    seed: int = 0,
    shape: tuple[int, int, int] = SHAPE,
    misclassified: int = 2,
) -> tuple[LinearClassifier, torch.Tensor, torch.Tensor]:
    """A `classes`-class linear model (3 or more) whose nearest decision boundary, at every
    input, belongs to the class with the LOWEST logit: w_t = w_y − s·v (v a unit vector) with a
    small s, so that the gap z_y − z_t is the largest of all while the distance
    (z_y − z_t)/‖w_y − w_t‖ = r is the smallest. Built in float64 around x₀ (near the middle of
    the range): every other class k gets a distance r_k = r·U(1.6, 4) and the gap
    r_k·‖w_y − w_k‖, class t a gap 1.5-3 times the largest of those; the inputs are x₀ plus
    offsets of norm at most 0.2 r, so the order of distances and logits holds at each of them.
    r lies between 1/300 and 1/10 of the width of the range. The first `misclassified` rows
    carry a wrong label. The exact answers are for the caller to compute (and check)."""
    if classes < 3:
        raise ValueError("the lowest-ranked class differs from the runner-up from 3 classes on")
    gen = torch.Generator().manual_seed(seed)
    lo, hi = value_range
    width = hi - lo
    n = math.prod(shape)
    weight = torch.randn((classes, n), generator=gen, dtype=torch.float64)
    y, t = torch.randperm(classes, generator=gen)[:2].tolist()
    x0 = (lo + hi) / 2 + (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 0.1 * width
    r = width * 10 ** (-1 - 1.5 * float(torch.rand(1, generator=gen)))
    distances = r * (1.6 + 2.4 * torch.rand(classes, generator=gen, dtype=torch.float64))
    gaps = distances * (weight[y] - weight).norm(dim=1)
    gaps[y] = 0.0
    gaps[t] = float(gaps.max()) * (1.5 + 1.5 * float(torch.rand(1, generator=gen)))
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    weight[t] = weight[y] - gaps[t] / r * v / v.norm()
    bias = -gaps - weight @ x0  # logits at x₀: 0 for y, −gap for the others
    offsets = torch.randn((count, n), generator=gen, dtype=torch.float64)
    lengths = 0.2 * r * torch.rand(count, generator=gen, dtype=torch.float64)
    x = x0 + offsets * (lengths / offsets.norm(dim=1))[:, None]
    labels = torch.full((count,), y, dtype=torch.long)
    labels[:misclassified] = (y + 1 + torch.arange(misclassified) % (classes - 1)) % classes
    model = LinearClassifier(weight.float(), bias.float())
    return model, x.float().view(count, *shape), labels


def linear_minimal_l2(
    model: LinearClassifier,
    seen: torch.Tensor,
    labels: torch.Tensor,
    value_range: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 exact minimal ℓ2 norms of a linear model at `seen` (the images the model sees):
    min over k ≠ y of (z_y − z_k)/‖w_y − w_k‖ for every correctly classified row (0 for the
    others), after checking that the minimiser lies in the value range; and the class of the
    nearest boundary (−1 for misclassified rows)."""
    weight, bias = model.weight.double(), model.bias.double()
    x = seen.flatten(1).double()
    logits = x @ weight.T + bias
    out = torch.zeros(len(x), dtype=torch.double)
    nearest = torch.full((len(x),), -1, dtype=torch.long)
    lo, hi = value_range
    for row, label in enumerate(labels.tolist()):
        if int(logits[row].argmax()) != label:
            continue
        normals = weight[label] - weight
        gaps = logits[row, label] - logits[row]
        norms = normals.norm(dim=1)
        distance = torch.where(norms > 0, gaps / norms, torch.inf)
        distance[label] = torch.inf
        k = int(distance.argmin())
        minimiser = x[row] - distance[k] * normals[k] / norms[k]
        assert lo <= float(minimiser.min()) and float(minimiser.max()) <= hi  # box not active
        out[row], nearest[row] = distance[k], k
    return out, nearest
