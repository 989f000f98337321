"""Tiny models whose behaviour under perturbation is known exactly (engine core tests)."""

from __future__ import annotations

import torch

from schemas.audits import AuditConfig
from schemas.model_spec import ModelSpec


class Identity(torch.nn.Module):
    """With input 'adjoint': the zero-filled reconstruction Ψ(y) = A* y."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Linear(torch.nn.Module):
    """Ψ(y) = B vec(y), reshaped to the image: Jacobian B everywhere."""

    def __init__(self, matrix: torch.Tensor, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.image_shape = image_shape

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (y.flatten(1) @ self.matrix.T).view(-1, *self.image_shape)


class GainAlong(torch.nn.Module):
    """Ψ(y) = y + (g − 1)⟨y, u⟩u for a unit image u: gain g along u, identity elsewhere."""

    def __init__(self, direction: torch.Tensor, gain: float) -> None:
        super().__init__()
        self.register_buffer("direction", direction / direction.norm())
        self.gain = gain

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        u = self.direction.flatten()
        coefficient = y.flatten(1) @ u
        return y + (self.gain - 1.0) * (coefficient[:, None] * u).view(-1, *y.shape[1:])


def spec(shape: tuple[int, int, int], input: str = "adjoint", complex: bool = False) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "tiny",
            "task": "reconstruction",
            "input": input,
            "image_shape": list(shape),
            "complex": complex,
        }
    )


def config(**fields: object) -> AuditConfig:
    base: dict[str, object] = {
        "dataset": {"builtin": "ellipses", "count": 3, "size": 16, "seed": 1},
        "operator": {"kind": "denoising"},
        "checks": [{"kind": "random_noise", "levels": [0.05], "samples": 4}],
        "device": "cpu",
    }
    base.update(fields)
    return AuditConfig.model_validate(base)
