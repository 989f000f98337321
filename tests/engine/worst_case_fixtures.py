"""Small operators and subjects whose worst case is known exactly (shared by the worst-case,
attack and baseline tests). They implement workers.engine.context.Operator."""

from __future__ import annotations

import torch

from workers.engine.context import PassCounter, Reconstructor, Subject


class DenseOperator:
    """y = M vec(x) for a dense [m, n] matrix; every entry of y is measured."""

    kind = "dense"

    def __init__(self, matrix: torch.Tensor, image_shape: tuple[int, int, int]) -> None:
        self.matrix = matrix
        self.image_shape = image_shape
        self.measurement_shape = (matrix.shape[0],)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.matrix.T

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (y @ self.matrix).view(-1, *self.image_shape)

    def project(self, e: torch.Tensor) -> torch.Tensor:
        return e

    def norm(self, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(y.flatten(1), dim=1)


class MaskedFourierOperator:
    """Single-coil MRI in deepinv's layout: x is [B, 2, H, W] (real, imaginary), y is the full
    orthonormal k-space [B, 2, H, W] with zeros off the mask. A* A is the mask's projection,
    so the zero-filled reconstruction A* has amplification exactly 1."""

    kind = "mri"

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask.to(torch.float32)  # [H, W] of 0/1
        h, w = mask.shape
        self.image_shape = (2, h, w)
        self.measurement_shape = (2, h, w)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.fft.fft2(torch.complex(x[:, 0], x[:, 1]), norm="ortho") * self.mask
        return torch.stack([k.real, k.imag], dim=1)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        image = torch.fft.ifft2(torch.complex(y[:, 0], y[:, 1]) * self.mask, norm="ortho")
        return torch.stack([image.real, image.imag], dim=1)

    def project(self, e: torch.Tensor) -> torch.Tensor:
        return e * self.mask

    def norm(self, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm((y * self.mask).flatten(1), dim=1)


def random_mask(size: int, fraction: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(size, size, generator=gen) < fraction).float()
    mask[0, 0] = 1.0  # keep the mean so images are not all null space
    return mask


def counting_subject(reconstruct: Reconstructor, name: str = "model") -> Subject:
    """A Subject that counts one forward pass per image, as workers.engine.subjects does."""
    counter = PassCounter()

    def counted(y: torch.Tensor) -> torch.Tensor:
        counter.forward += y.shape[0]
        return reconstruct(y)

    return Subject(name, counted, counter)


def linear_subject(matrix: torch.Tensor, image_shape: tuple[int, int, int]) -> Subject:
    """Ψ(y) = B y: Lipschitz constant σ_max(B)."""
    return counting_subject(lambda y: (y.flatten(1) @ matrix.T).view(-1, *image_shape))


def zero_filled_subject(operator: MaskedFourierOperator) -> Subject:
    return counting_subject(operator.A_adjoint)


def phantom(size: int, channels: int = 1) -> torch.Tensor:
    """A piecewise-constant image (two rectangles and a disk): TV-sparse, [1, C, size, size]."""
    grid = torch.arange(size, dtype=torch.float32)
    rows, cols = grid.view(-1, 1), grid.view(1, -1)
    image = torch.zeros(size, size)
    image[size // 8 : size // 2, size // 8 : size // 2] = 1.0
    image[size // 2 : 7 * size // 8, size // 4 : 3 * size // 4] = 0.5
    image[(rows - 0.7 * size) ** 2 + (cols - 0.7 * size) ** 2 < (size / 6) ** 2] = 0.8
    out = torch.zeros(1, channels, size, size)
    out[:, 0] = image
    return out
