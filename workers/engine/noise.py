"""Random measurement noise of a given relative size: the draws of `random_noise` (and its
classifier variant), the Gaussian starts of `worst_case` and the noise of `false_negative`.

`unit_noise` is uniform on the sphere ‖e‖ = δ‖y‖ over the measured entries: an isotropic
Gaussian draw on those entries, projected and normalised to norm exactly δ‖y‖, one seeded draw
per seed, on the CPU (so every device sees the same numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.engine.context import AuditContext


def unit_noise(
    ctx: AuditContext,
    shape: Sequence[int],
    seeds: Sequence[int],
    y_norm: torch.Tensor,
    level: float,
) -> torch.Tensor:
    """Noise uniform on the sphere ‖e‖ = δ‖y‖ over the measured entries, one sample per seed:
    a standard Gaussian is isotropic, so projected and normalised it is uniform on the sphere
    of the measured subspace. Drawn on the CPU so every device sees the same numbers."""
    noise = torch.stack(
        [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    ).to(ctx.device)
    noise = ctx.operator.project(noise)
    scale = level * y_norm / ctx.operator.norm(noise).clamp_min(1e-12)
    return noise * scale.view(-1, *([1] * len(shape)))
