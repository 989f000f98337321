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


def orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A seeded Haar-random orthogonal matrix (float64)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def near_isotropic_inverse(
    n: int, gap: float, rotated: bool, gen: torch.Generator, floor: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A square A whose inverse B = A⁻¹ has singular values 1, then 1 − gap down to `floor`
    (evenly; default 1 − gap: B is isotropic off its top direction, the slowest ascent): the top
    two `gap` apart. Returns (A, B, s) in float64, s the singular values of B (σ_max(B) = 1
    exactly). Diagonal (rotated=False): B is a seeded permutation of diag(s)."""
    low = 1 - gap if floor is None else floor
    s = torch.cat(
        [torch.ones(1, dtype=torch.float64), torch.linspace(1 - gap, low, n - 1).double()]
    )
    if rotated:
        left, right = orthogonal(n, gen), orthogonal(n, gen)
    else:
        left = right = torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    b = left @ torch.diag(s) @ right.T
    a = right @ torch.diag(1 / s) @ left.T
    return a, b, s


class ReluSwitch:
    """Ψ(y) = B y + c·relu(⟨v, y⟩ − t)·u with B = U·diag(g, s₂, …)·Vᵀ (g > 1 ≥ s₂ ≥ …), v = V₁
    its top right singular vector, u = U₁ = B v / g, and A = B⁻¹, y = A x: at y the ReLU is off
    (t = ⟨v, y⟩ + a for every image, a > 0) and Ψ(y) = x.

    The exact worst case over ‖e‖ ≤ ρ: write e = αv + e⊥ (e⊥ ⊥ v, so B e⊥ ⊥ u). Then
    Ψ(y + e) − Ψ(y) = (gα + c·relu(α − a))·u + B e⊥ and its squared norm is at most
    f(α) = (gα + c·relu(α − a))² + s₂²(ρ² − α²), with equality at e⊥ along V₂. f is convex on
    [−ρ, a] (g > s₂) and on [a, ρ], and f(a) ≤ g²ρ², so its maximum is at α = ±ρ (e⊥ = 0):
    max ‖Ψ(y + e) − Ψ(y)‖ = max(gρ, (g + c)ρ − c·a) (the second only when ρ > a), and the same
    e = ±ρv maximises the Lipschitz ratio ‖Ψ(y+e) − Ψ(y)‖/‖e‖ (for ‖e‖ = r ≤ ρ it is at most
    max(g, g + c − c·a/r), increasing in r). As Ψ(y) = x, the worst error against the ground
    truth is the same number."""

    def __init__(
        self,
        size: int,
        gain: float,
        slope: float,
        threshold: float,
        images: int,
        seed: int,
        rotated: bool = True,
        floor: float = 1.0,
    ) -> None:
        """`threshold`: a as a fraction of the 0.05 radius of the image with the smallest ‖y‖;
        s₂, … run evenly from 1 down to `floor` (1: B is isotropic off v, the slowest ascent)."""
        gen = torch.Generator().manual_seed(seed)
        n = size * size
        self.shape = (1, size, size)
        s = torch.cat([torch.tensor([gain]), torch.linspace(1.0, floor, n - 1)]).double()
        if rotated:
            left, right = orthogonal(n, gen), orthogonal(n, gen)
        else:
            left = right = torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
        self.b = left @ torch.diag(s) @ right.T
        self.a_matrix = right @ torch.diag(1 / s) @ left.T
        self.v, self.u = right[:, 0], left[:, 0]
        self.gain, self.slope = gain, slope
        x = torch.rand(images, n, generator=gen, dtype=torch.float64)
        # move each image along Aᵀv so that ⟨v, A x⟩ is the same for all (one scalar t)
        direction = self.a_matrix.T @ self.v
        x = x + ((0.5 - x @ direction) / direction.dot(direction)).view(-1, 1) * direction
        self.x = x.float().view(images, *self.shape)
        self.y = (x @ self.a_matrix.T).float()  # what the search sees
        y64 = self.y.double()
        self.threshold = float((y64 @ self.v).max() + threshold * 0.05 * y64.norm(dim=1).min())
        self.operator = DenseOperator(self.a_matrix.float(), self.shape)
        self.subject = counting_subject(self._reconstruct)

    def _reconstruct(self, y: torch.Tensor) -> torch.Tensor:
        flat = y.flatten(1)
        b, v, u = self.b.to(flat.dtype), self.v.to(flat.dtype), self.u.to(flat.dtype)
        switch = torch.relu(flat @ v - self.threshold)
        return (flat @ b.T + self.slope * switch[:, None] * u).view(-1, *self.shape)

    def exact_change(self, level: float) -> torch.Tensor:
        """[images] max over ‖e‖ ≤ level·‖y‖ of ‖Ψ(y+e) − Ψ(y)‖, float64."""
        y = self.y.double()
        radius = level * y.norm(dim=1)
        distance = self.threshold - y @ self.v  # a > 0 per image
        switched = (self.gain + self.slope) * radius - self.slope * distance
        linear = self.gain * radius
        return torch.where(radius > distance, torch.maximum(linear, switched), linear)

    def change(self, e: torch.Tensor) -> torch.Tensor:
        """‖Ψ(y+e) − Ψ(y)‖ per image, float64."""
        with torch.no_grad():
            y = self.y.double()
            return (self._reconstruct(y + e.double()) - self._reconstruct(y)).flatten(1).norm(dim=1)
