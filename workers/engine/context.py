"""The objects every check works with. This file is the contract inside the engine:

- `Operator`: the forward operator A (wraps a deepinv physics), with the measurement-space
  conventions every check must share (which entries of y are real measurements, their norm).
- `Reconstructor`: Ψ as a function of the measurements y, whatever the model's input convention
  (measurement, adjoint, image); the baseline (TV / wavelet) is a Reconstructor too.
- `AuditContext`: images, operator, device, seed, noise level and the pass counters.
- `Check`: a check kind, run shard by shard (a slice of images) and merged into one result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class PassCounter:
    """Forward and backward passes through the audited subject (the report's `cost`)."""

    forward: int = 0
    backward: int = 0


class Operator(Protocol):
    """A forward operator. Measurements keep deepinv's tensor layout (MRI: full k-space
    [B, 2, H, W] with zeros off the mask); `mask` says which entries are real measurements."""

    kind: str
    image_shape: tuple[int, int, int]  # [C, H, W] of x in the operator's domain
    measurement_shape: tuple[int, ...]  # per sample, without the batch dimension

    def A(self, x: torch.Tensor) -> torch.Tensor: ...

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor: ...

    def project(self, e: torch.Tensor) -> torch.Tensor:
        """Zero the entries of a measurement-space tensor that are not measured."""
        ...

    def norm(self, y: torch.Tensor) -> torch.Tensor:
        """Per-sample ℓ2 norm over measured entries: shape [B]."""
        ...


# Ψ as a function of y: [B, *measurement_shape] -> [B, C, H, W]; differentiable.
Reconstructor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Subject:
    """What a check attacks: the model or the baseline, as a function of y."""

    name: str  # "model" | "baseline"
    reconstruct: Reconstructor
    counter: PassCounter = field(default_factory=PassCounter)
    # A sampler (two calls at one input differ; workers.engine.probe): the checks that can
    # audit one average its draws (workers.engine.sampling), the others warn.
    stochastic: bool = False
    # The network behind `reconstruct`, for certified bounds (worst_case's `certify`): the
    # torch module and what it reads, "measurement" (y), "adjoint" (A* y) or "image" (y as an
    # image). None for a subject that is no network of ours (the baseline, an average of draws).
    network: Any = None
    network_input: str | None = None


@dataclass
class AuditContext:
    operator: Operator
    images: torch.Tensor  # ground truth x, [N, C, H, W], on device
    device: torch.device
    seed: int
    noise_level: float  # relative Gaussian noise of the clean measurements y = Ax + e
    value_range: tuple[float, float] = (0.0, 1.0)
    warnings: list[str] = field(default_factory=list)
    # class labels [N] (int64, on device) of a classifier audit; None for reconstruction audits
    labels: torch.Tensor | None = None
    progress: Callable[[float, str], None] = lambda fraction, message: None
    should_stop: Callable[[], bool] = lambda: False
    # For checks that build other operators (more_samples): the audit's operator config, the
    # directory its file references resolve against, and the subject ("model" | "baseline")
    # rebuilt for another operator (None where the audit cannot rebuild it).
    operator_config: Any = None
    base_dir: Path | None = None
    subject_for: Callable[[str, Operator], Subject] | None = None

    def measurements(self, indices: Sequence[int]) -> torch.Tensor:
        """y = A x + e for the given images, with e seeded per image (same y in every shard)."""
        x = self.images[list(indices)]
        y = self.operator.A(x)
        if self.noise_level <= 0:
            return y
        noise = torch.stack(
            [
                torch.randn(
                    y.shape[1:],
                    generator=torch.Generator().manual_seed(self.seed * 1_000_003 + int(i)),
                    dtype=y.dtype,
                )
                for i in indices
            ]
        ).to(y.device)
        noise = self.operator.project(noise)
        scale = (
            self.noise_level * self.operator.norm(y) / self.operator.norm(noise).clamp_min(1e-12)
        )
        return y + noise * scale.view(-1, *([1] * (y.dim() - 1)))


# A check's `merge` may return this key: {file name: numpy array (saved as .npy) or bytes}. The
# audit writes the files next to report.json (prefixed with the check's index and subject), lists
# them in the check's `artifacts`, and removes the key from the report.
ARTIFACT_FILES_KEY = "_files"


class Check(Protocol):
    """One check kind. `run` handles one shard (a slice of image indices) and returns a
    JSON-able dict of per-image raw values; `merge` turns all shards' dicts (in shard order)
    into the check's report object: kind-specific fields, `warnings`, and the threshold's
    `comparisons` with the `verdict` computed from them (schemas.verdicts.judge)."""

    kind: str

    def run(
        self,
        config: Any,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]: ...

    def merge(self, config: Any, shards: list[dict[str, Any]]) -> dict[str, Any]: ...
