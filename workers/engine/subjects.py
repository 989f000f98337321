"""The audited model as a function of the measurements y (its input convention applied)."""

from __future__ import annotations

import torch

from schemas.model_spec import ModelSpec
from workers.engine.context import Operator, PassCounter, Subject
from workers.engine.liveness import run_model
from workers.shared.errors import EngineInputError


def model_subject(
    model: torch.nn.Module, spec: ModelSpec, operator: Operator, counter: PassCounter
) -> Subject:
    """Ψ(y): `measurement` → model(y); `adjoint` → model(A* y); `image` → model(y), only where y
    is an image (measurement shape equal to the image shape: denoising, inpainting, blur).

    Counts one forward pass per image of every batch; backward passes are counted by the checks
    that run them."""
    if spec.task != "reconstruction":
        raise EngineInputError(
            f"these checks audit reconstruction models; the spec's task is {spec.task!r}"
        )
    if spec.input == "image" and tuple(operator.measurement_shape) != tuple(spec.image_shape):
        raise EngineInputError(
            "a model with input 'image' needs measurements shaped like its images "
            f"{list(spec.image_shape)}; "
            f"operator {operator.kind!r} gives {list(operator.measurement_shape)}"
        )
    adjoint_first = spec.input == "adjoint"
    expected = tuple(spec.image_shape)

    def reconstruct(y: torch.Tensor) -> torch.Tensor:
        counter.forward += y.shape[0]
        out = run_model(model, operator.A_adjoint(y) if adjoint_first else y)
        if not isinstance(out, torch.Tensor) or tuple(out.shape[1:]) != expected:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise EngineInputError(
                f"the model returned {shape}, not [batch, {', '.join(map(str, expected))}]"
            )
        return out

    network = model if isinstance(model, torch.nn.Module) else None
    return Subject(
        name="model",
        reconstruct=reconstruct,
        counter=counter,
        network=network,
        network_input=spec.input if network is not None else None,
    )
