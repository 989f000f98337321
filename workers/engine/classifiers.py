"""The audited classifier: logits of an image, and the same model seen on the unit box.

Attack libraries (pyautoattack, adv-lib) assume inputs in [0, 1] and clip to that box. A model
whose `value_range` is [lo, hi] is handed to them as `u ↦ model(lo + (hi − lo) u)`: clipping to
[0, 1] is clipping to the value range, and a norm measured on the unit box is (hi − lo) times
the same norm in the model's units. Every check converts ε in and norms out with `scale`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from schemas.model_spec import ModelSpec
from workers.engine.context import PassCounter, Subject
from workers.engine.liveness import run_model
from workers.shared.errors import EngineInputError


class UnitBoxClassifier(torch.nn.Module):
    """`model(lo + (hi − lo) u)` for u in [0, 1]; counts forward and backward passes per image
    and names a wrong output shape instead of failing deep inside an attack."""

    def __init__(
        self,
        model: torch.nn.Module,
        value_range: tuple[float, float],
        num_classes: int,
        counter: PassCounter,
    ) -> None:
        super().__init__()
        self.model = model
        self.low, self.high = float(value_range[0]), float(value_range[1])
        self.num_classes = num_classes
        self.counter = counter

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        batch = u.shape[0]
        self.counter.forward += batch
        logits = run_model(self.model, self.low + (self.high - self.low) * u)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (
            batch,
            self.num_classes,
        ):
            shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise EngineInputError(
                f"the classifier returned {shape}, not logits [batch, {self.num_classes}]"
            )
        if logits.requires_grad:
            # one backward pass per image whenever a gradient flows back through the logits
            logits.register_hook(lambda grad: self._count_backward(batch, grad))
        return logits

    def _count_backward(self, batch: int, grad: torch.Tensor) -> torch.Tensor:
        self.counter.backward += batch
        return grad


@dataclass
class ClassifierSubject(Subject):
    """What classifier checks attack. `reconstruct` (the Subject interface) returns logits."""

    unit_model: UnitBoxClassifier | None = None
    num_classes: int = 2
    value_range: tuple[float, float] = (0.0, 1.0)
    counter: PassCounter = field(default_factory=PassCounter)

    @property
    def scale(self) -> float:
        """hi − lo: a norm on the unit box times this is the norm in the model's units."""
        return self.value_range[1] - self.value_range[0]

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.value_range[0]) / self.scale).clamp(0.0, 1.0)

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        return self.value_range[0] + self.scale * u

    @property
    def box_model(self) -> UnitBoxClassifier:
        assert self.unit_model is not None  # classifier_subject always sets it
        return self.unit_model

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images in the model's units (clipped to the value range first)."""
        return self.box_model(self.to_unit(x))

    def predict(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Predicted classes [N] of images in the model's units, without gradients."""
        with torch.no_grad():
            return torch.cat(
                [self.logits(x[i : i + batch]).argmax(dim=1) for i in range(0, x.shape[0], batch)]
            )


def classifier_subject(
    model: torch.nn.Module, spec: ModelSpec, counter: PassCounter
) -> ClassifierSubject:
    if spec.task != "classification" or spec.num_classes is None:
        raise EngineInputError("a classifier subject needs task 'classification' and num_classes")
    unit = UnitBoxClassifier(model, spec.value_range, spec.num_classes, counter)
    subject = ClassifierSubject(
        name="model",
        reconstruct=lambda x: x,  # replaced below: the subject's own logits
        counter=counter,
        unit_model=unit,
        num_classes=spec.num_classes,
        value_range=(float(spec.value_range[0]), float(spec.value_range[1])),
    )
    subject.reconstruct = subject.logits
    return subject
