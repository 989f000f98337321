"""Seeded k-space sampling masks for the MRI operator: [H, W] float tensors of 0/1 with the
centre of k-space at (H // 2, W // 2), as deepinv's centred FFT expects."""

from __future__ import annotations

import math
import warnings

import torch
from deepinv.physics.generator import EquispacedMaskGenerator, RandomMaskGenerator

from workers.shared.errors import EngineInputError

# Golden angle in radians: successive radial spokes never repeat and cover k-space evenly.
_GOLDEN_ANGLE = math.pi * (math.sqrt(5.0) - 1.0) / 2.0


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def line_mask(
    height: int, width: int, acceleration: float, center_fraction: float, seed: int, random: bool
) -> torch.Tensor:
    """Cartesian phase-encoding lines (columns): a fully sampled centre band plus equispaced
    (random=False, random offset) or uniformly random (random=True) lines; deepinv's generators."""
    cls = RandomMaskGenerator if random else EquispacedMaskGenerator
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            generator = cls(
                (height, width),
                acceleration=acceleration,  # annotated int; floats work (W // acc)
                center_fraction=center_fraction,
                rng=_generator(seed),
            )
            mask = generator.step(batch_size=1, seed=seed)["mask"]
    except ValueError as exc:
        raise EngineInputError(f"mri mask: {exc}") from None
    return mask[0, 0].float()


def variable_density_mask(
    height: int, width: int, acceleration: float, center_fraction: float, seed: int
) -> torch.Tensor:
    """2-D variable-density random points: a fully sampled centre square of side
    center_fraction·min(H, W), then exactly round(H·W/acceleration) points in all, drawn without
    replacement with probability ∝ (1 − r)² + 0.02 (r: distance to the centre, scaled to [0, 1])."""
    total = max(1, round(height * width / acceleration))
    ky = torch.arange(height, dtype=torch.float64) - height // 2
    kx = torch.arange(width, dtype=torch.float64) - width // 2
    ry, rx = torch.meshgrid(ky / max(height / 2, 1), kx / max(width / 2, 1), indexing="ij")
    radius = torch.sqrt(ry**2 + rx**2) / math.sqrt(2.0)
    half = int(center_fraction * min(height, width)) // 2
    centre = (ky.abs().view(-1, 1) <= half) & (kx.abs().view(1, -1) <= half)
    if center_fraction == 0:
        centre = torch.zeros_like(centre)
    mask = centre.clone().flatten()
    remaining = total - int(mask.sum())
    if remaining > 0:
        weights = ((1.0 - radius).clamp_min(0.0) ** 2 + 0.02).flatten()
        weights[mask] = 0.0
        picked = torch.multinomial(
            weights, remaining, replacement=False, generator=_generator(seed)
        )
        mask[picked] = True
    return mask.view(height, width).float()


def radial_mask(height: int, width: int, acceleration: float, seed: int) -> torch.Tensor:
    """Spokes through the centre of k-space at golden-angle increments from a seeded random
    start, added until the sampled fraction reaches 1/acceleration. The centre is dense by
    construction, so center_fraction does not apply."""
    target = height * width / acceleration
    start = float(torch.rand(1, generator=_generator(seed), dtype=torch.float64)) * math.pi
    reach = math.hypot(height, width) / 2
    steps = torch.linspace(-reach, reach, int(4 * reach) + 1, dtype=torch.float64)
    mask = torch.zeros(height, width)
    spoke = 0
    while mask.sum() < target and spoke < 4 * (height + width):
        angle = start + spoke * _GOLDEN_ANGLE
        rows = torch.round(height // 2 + steps * math.sin(angle)).long()
        cols = torch.round(width // 2 + steps * math.cos(angle)).long()
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        mask[rows[inside], cols[inside]] = 1.0
        spoke += 1
    return mask
