"""Per-image reconstruction quality: relative error, PSNR and SSIM (deepinv's metrics).

Complex images (2 channels: real, imaginary) are compared on their magnitude for PSNR and SSIM;
the relative error uses all channels, which is the ℓ2 norm of the complex difference."""

from __future__ import annotations

import torch
from deepinv.loss.metric import PSNR, SSIM

# torchmetrics' default Gaussian window is 11 pixels; smaller images need a smaller one.
_SSIM_WINDOW = 11


def relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """‖x̂ − x‖ / ‖x‖ per image, shape [B]."""
    diff = (x_hat - x).flatten(1).norm(dim=1)
    return diff / x.flatten(1).norm(dim=1).clamp_min(1e-12)


def _pixel_range(value_range: tuple[float, float], complex_images: bool) -> tuple[float, float]:
    lo, hi = value_range
    if complex_images:
        return 0.0, max(abs(lo), abs(hi))  # magnitudes
    return lo, hi


def psnr(
    x_hat: torch.Tensor, x: torch.Tensor, value_range: tuple[float, float], complex_images: bool
) -> torch.Tensor:
    """10 log10((max − min)² / MSE) per image, on magnitudes for complex images."""
    lo, hi = _pixel_range(value_range, complex_images)
    metric = PSNR(max_pixel=hi, min_pixel=lo, complex_abs=complex_images)
    return metric(x_hat, x)


def ssim(
    x_hat: torch.Tensor, x: torch.Tensor, value_range: tuple[float, float], complex_images: bool
) -> torch.Tensor:
    """Structural similarity per image (Gaussian window, 11 pixels or the largest odd size that
    fits), on magnitudes for complex images."""
    lo, hi = _pixel_range(value_range, complex_images)
    side = min(x.shape[-2:])
    window = min(_SSIM_WINDOW, side if side % 2 else side - 1)
    metric = SSIM(
        max_pixel=hi,
        min_pixel=lo,
        complex_abs=complex_images,
        torchmetric_kwargs={"kernel_size": window},
    )
    return metric(x_hat, x)
