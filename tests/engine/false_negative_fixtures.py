"""Known answers of `false_negative` under MRI (tests/engine/test_false_negative_relative.py
and benchmarks/attack_strength.py).

A*A is a Fourier multiplier under MRI, so the recovery of a linear Ψ is a weighted share of the
lesion's spectrum, computed here in float64 with numpy's FFT (centred, orthonormal as in
deepinv). With ẑ the lesion's spectrum, M the 0/1 mask and M̃(k) = M(−k):

- complex images: A⁺ = A* (zero filling), ρ_A⁺ = Σ M|ẑ|² / Σ|ẑ|²;
- real images: A*A = Re(F*MF) is the multiplier (M + M̃)/2 (a real image's spectrum is
  conjugate-symmetric), so A⁺A is the multiplier 1[M ∨ M̃] and ρ_A⁺ = Σ (M ∨ M̃)|ẑ|² / Σ|ẑ|²,
  while zero filling A* returns ρ_zf = Σ (M + M̃)/2 |ẑ|² / Σ|ẑ|² = Σ M|ẑ|² / Σ|ẑ|² (|ẑ| is
  symmetric), between ρ_A⁺/2 and ρ_A⁺.
"""

from __future__ import annotations

import numpy as np
import torch

from schemas.operators import MRIOperator
from workers.engine.operators import LinearOperator, build_operator


def mirror(mask: np.ndarray) -> np.ndarray:
    """M̃(k) = M(−k) in centred coordinates (frequency 0 at index N // 2)."""
    rows = (2 * (mask.shape[0] // 2) - np.arange(mask.shape[0])) % mask.shape[0]
    cols = (2 * (mask.shape[1] // 2) - np.arange(mask.shape[1])) % mask.shape[1]
    return mask[np.ix_(rows, cols)]


def lesion_pattern(shape: str, size: int) -> np.ndarray:
    """The lesion's 0/1 support, as docs/theorem.md defines it (disk of radius size, square)."""
    if shape == "square":
        return np.ones((size, size))
    grid = np.arange(-size, size + 1)
    return (grid[:, None] ** 2 + grid[None, :] ** 2 <= size * size).astype(np.float64)


def exact_fractions(
    mask: np.ndarray, pattern: np.ndarray, row: int, col: int, real: bool
) -> tuple[float, float]:
    """(ρ_A⁺, ρ of zero filling) of a lesion of support `pattern` at (row, col), float64."""
    z = np.zeros(mask.shape)
    z[row : row + pattern.shape[0], col : col + pattern.shape[1]] = pattern
    energy = np.abs(np.fft.fftshift(np.fft.fft2(z, norm="ortho"))) ** 2
    zero_filling = float((mask * energy).sum() / energy.sum())
    carried = np.maximum(mask, mirror(mask)) if real else mask
    return float((carried * energy).sum() / energy.sum()), zero_filling


def mri_operator(
    size: int, acceleration: float, mask: str, seed: int, real: bool = True
) -> LinearOperator:
    """The audit's MRI operator for these settings, on real [1, H, W] or complex [2, H, W]
    images (the engine's own builder)."""
    operator = MRIOperator.model_validate(
        {"kind": "mri", "acceleration": acceleration, "mask": mask, "seed": seed}
    )
    return build_operator(operator, (1 if real else 2, size, size))


def mri_mask(size: int, acceleration: float, mask: str, seed: int) -> np.ndarray:
    """The operator's [H, W] 0/1 mask (the same for real and complex images)."""
    built = mri_operator(size, acceleration, mask, seed)
    assert built.mask is not None
    return built.mask[0].double().numpy()


class RealPseudoInverse(torch.nn.Module):
    """A⁺ for real images under MRI, from the input A*y: (A*A)⁺ is the Fourier multiplier
    g = 1/((M + M̃)/2) on M ∨ M̃, 0 elsewhere (1 where both k and −k are sampled, 2 where one
    is); g is symmetric, so a real input gives a real output."""

    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        both = (mask + mirror(mask)) / 2.0
        gain = np.where(both > 0, 1.0 / np.where(both > 0, both, 1.0), 0.0)
        # centred frequencies → numpy's order
        self.register_buffer("gain", torch.from_numpy(np.fft.ifftshift(gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.fft2(x.double()) * self.gain
        return torch.fft.ifft2(spectrum).real.to(x.dtype)


class Scaled(torch.nn.Module):
    """Ψ = factor · base."""

    def __init__(self, base: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.base = base
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * self.base(x)
