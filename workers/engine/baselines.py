"""The stable reference: untrained sparse regularisation of the same operator, as a Reconstructor.

- `tv`:      x̂ = argmin ½‖Ax − y‖² + λ‖∇x‖_{1,2}, by Chambolle–Pock (PDHG) on K = [A; ∇], using
             deepinv's finite differences (TVPrior.nabla / nabla_adjoint);
- `wavelet`: x̂ = argmin ½‖Ax − y‖² + λ‖Wx‖₁ (detail coefficients), by FISTA with deepinv's
             WaveletPrior proximal operator (ptwt, differentiable soft-thresholding).

Both are a fixed number of unrolled iterations (`iterations`) of plain tensor operations, so the
map y ↦ x̂ is deterministic and differentiable and can be attacked like a network.

Why not deepinv's own solvers: they run under no_grad unless built with `unfold=True`, and the
TV proximal step there is itself an inner Chambolle–Pock loop (TVDenoiser) with a data-dependent
stopping rule and warm-start state kept between calls, so an attack's successive evaluations
would see different maps and backpropagate through up to 1000 inner iterations per outer one.
A single PDHG loop on the whole problem needs no inner solver and has no state.
"""

from __future__ import annotations

import math

import pywt
import torch
from deepinv.optim import TVPrior, WaveletPrior

from schemas.checks import Baseline
from workers.engine.context import Operator, Reconstructor

# ‖∇‖² ≤ 4 · (number of spatial dimensions) for forward differences
_GRADIENT_NORM_SQUARED = 8.0
_POWER_ITERATIONS = 50
_NORM_SAFETY = 1.02  # power iteration underestimates ‖A‖; step sizes must not exceed 1/‖K‖
_WAVELET = "haar"  # orthonormal with zero padding on even sizes: the prox below is exact


def build_baseline(config: Baseline, operator: Operator) -> Reconstructor:
    """A TV or ℓ1-wavelet reconstruction of `operator`'s measurements (y ↦ x̂)."""
    norm_squared = operator_norm_squared(operator) * _NORM_SAFETY
    if config.kind == "tv":
        return _tv_reconstructor(operator, config.lambda_, config.iterations, norm_squared)
    return _wavelet_reconstructor(operator, config.lambda_, config.iterations, norm_squared)


def operator_norm_squared(operator: Operator, seed: int = 0) -> float:
    """‖A‖² = largest eigenvalue of A*A, by power iteration from a seeded random image."""
    start = torch.randn((1, *operator.image_shape), generator=torch.Generator().manual_seed(seed))
    probe = operator.A_adjoint(operator.A(torch.zeros(1, *operator.image_shape)))
    x = start.to(device=probe.device, dtype=probe.dtype)
    eigenvalue = 0.0
    with torch.no_grad():
        for _ in range(_POWER_ITERATIONS):
            x = x / torch.linalg.vector_norm(x).clamp_min(1e-30)
            ata_x = operator.A_adjoint(operator.A(x))
            eigenvalue = float(torch.sum(x * ata_x))
            x = ata_x
    return max(eigenvalue, 1e-12)


def _tv_reconstructor(
    operator: Operator, weight: float, iterations: int, norm_squared: float
) -> Reconstructor:
    prior = TVPrior()
    step = 0.99 / math.sqrt(norm_squared + _GRADIENT_NORM_SQUARED)  # τ = σ, τσ‖K‖² < 1

    def reconstruct(y: torch.Tensor) -> torch.Tensor:
        x = operator.A_adjoint(y)
        x_bar = x
        dual_data = torch.zeros_like(y)
        dual_gradient = torch.zeros_like(prior.nabla(x))
        for _ in range(iterations):
            # prox of σF*, F = ½‖· − y‖²
            dual_data = (dual_data + step * (operator.A(x_bar) - y)) / (1 + step)
            # prox of σ(λ‖·‖_{1,2})* = projection onto pointwise ℓ2 balls of radius λ
            dual_gradient = dual_gradient + step * prior.nabla(x_bar)
            pointwise = torch.linalg.vector_norm(dual_gradient, dim=-1, keepdim=True)
            dual_gradient = dual_gradient / (pointwise / weight).clamp_min(1.0)
            x_next = x - step * (operator.A_adjoint(dual_data) + prior.nabla_adjoint(dual_gradient))
            x_bar = 2 * x_next - x
            x = x_next
        return x

    return reconstruct


def _wavelet_reconstructor(
    operator: Operator, weight: float, iterations: int, norm_squared: float
) -> Reconstructor:
    _, height, width = operator.image_shape
    prior = WaveletPrior(level=_wavelet_levels(height, width), wv=_WAVELET, p=1)
    step = 1.0 / norm_squared

    def reconstruct(y: torch.Tensor) -> torch.Tensor:
        x = operator.A_adjoint(y)
        z, momentum = x, 1.0
        for _ in range(iterations):
            gradient = operator.A_adjoint(operator.A(z) - y)
            x_next = prior.prox(z - step * gradient, gamma=step * weight)
            momentum_next = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
            z = x_next + ((momentum - 1) / momentum_next) * (x_next - x)
            x, momentum = x_next, momentum_next
        return x

    return reconstruct


def _wavelet_levels(height: int, width: int) -> int:
    """Up to 3 levels, as many as the image size allows without padding (exact orthonormality)."""
    levels = 0
    size = min(height, width)
    while levels < 3 and size % 2 == 0 and size // 2 >= 2:
        size //= 2
        levels += 1
    return max(1, min(levels, pywt.dwt_max_level(min(height, width), _WAVELET)))
