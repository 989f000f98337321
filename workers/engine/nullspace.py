"""The kernel of A: null-space components of details, and the smallest singular directions.

- `null_component(operator, d)`: z = d − A⁺A d, so that A z = 0 and x, x + z have the same
  measurements. Exact where A*A is an orthogonal projection (inpainting, denoising, MRI on
  complex images: a mask behind a unitary FFT); from an explicit SVD in float64 for small
  images; otherwise conjugate gradients on A*A w = A*A d from w = 0, whose iterates stay in the
  range of A* and so converge to the minimum-norm solution w = A⁺A d. The residual ‖Az‖/‖z‖ is
  always reported: it says how far from exact the component is.
- `row_space_projector(operator, device)`: d ↦ A⁺A d by the same methods, as a reusable map
  (the SVD basis computed once): the part of a detail the data-consistent reconstruction A⁺
  returns.
- `smallest_directions(operator, k)`: unit images v with the smallest non-zero ‖Av‖: from the
  SVD for small images, otherwise by block power iteration on cI − G (c ≥ λ_max(G)), G the
  smaller of A*A and AA* (restricted to measured entries), so that a large exact null space does
  not crowd out the near-null directions. Directions with ‖Av‖ ≈ 0 are left out: a pair along
  an exact null direction has Ψ(Ax) = Ψ(Ax') and can never certify.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from workers.engine.context import Operator

# Images with at most this many unknowns (C·H·W) get the exact SVD projection.
DENSE_MAX_UNKNOWNS = 1024
# Singular values below this fraction of the largest are the exact null space: the operator
# runs in float32, so smaller ones cannot be told from rounding.
SINGULAR_RTOL = 1e-5
_TINY = 1e-30
# Block power iteration: extra vectors beyond those asked for (they absorb null directions)
# and power steps for the largest eigenvalue (the shift c).
_EXTRA_BLOCK = 8
_POWER_STEPS = 20


@dataclass
class NullComponent:
    z: torch.Tensor  # [B, C, H, W], A z ≈ 0
    residual: torch.Tensor  # [B]: ‖A z‖ / ‖z‖ (0 where z = 0)
    method: str  # "projection" | "dense" | "cg"
    iterations: int = 0  # conjugate-gradient iterations used


@dataclass
class Directions:
    vectors: torch.Tensor  # [k, C, H, W], unit norm
    singular_values: list[float]  # ‖A v‖ of each
    null_dimension_seen: int  # directions found with ‖Av‖ = 0 and left out
    converged: bool


def _norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1)


def is_projection(operator: Operator) -> bool:
    """Whether A*A is an orthogonal projection (so A⁺A = A*A)."""
    if operator.kind in ("inpainting", "denoising"):
        return True
    return operator.kind == "mri" and not getattr(operator, "real_into_complex", False)


def null_component(
    operator: Operator,
    d: torch.Tensor,
    method: str = "auto",
    iterations: int = 200,
    tolerance: float = 1e-7,
) -> NullComponent:
    """z = d − A⁺A d for a batch of details d [B, C, H, W]."""
    projector = row_space_projector(operator, d.device, method, iterations, tolerance)
    z = d - projector(d)
    z_norm = _norms(z)
    residual = operator.norm(operator.A(z)) / z_norm.clamp_min(_TINY)
    residual = torch.where(z_norm > 0, residual, torch.zeros_like(residual))
    return NullComponent(z=z, residual=residual, method=projector.method, iterations=projector.used)


def _auto_method(operator: Operator) -> str:
    if is_projection(operator):
        return "projection"
    if int(np.prod(operator.image_shape)) <= DENSE_MAX_UNKNOWNS:
        return "dense"
    return "cg"


@dataclass
class RowSpaceProjector:
    """d ↦ A⁺A d for a batch [B, C, H, W]: the minimum-norm solution of A w = A d, i.e. what
    the data-consistent reconstruction A⁺ returns of a detail d. Build with
    `row_space_projector`."""

    operator: Operator
    method: str  # "projection" | "dense" | "cg", chosen as in `null_component`
    rows: torch.Tensor | None = None  # "dense": orthonormal basis of the row space, float64
    iterations: int = 200
    tolerance: float = 1e-7
    used: int = 0  # "cg": the most iterations any call needed

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        if self.method == "projection":
            return self.operator.A_adjoint(self.operator.A(d))
        if self.method == "dense":
            assert self.rows is not None
            visible = (d.flatten(1).double() @ self.rows.T) @ self.rows
            return visible.to(d.dtype).view_as(d)
        visible, used = _cg_row_space_projection(self.operator, d, self.iterations, self.tolerance)
        self.used = max(self.used, used)
        return visible


def row_space_projector(
    operator: Operator,
    device: torch.device,
    method: str = "auto",
    iterations: int = 200,
    tolerance: float = 1e-7,
) -> RowSpaceProjector:
    """A⁺A as a map, by the method `null_component` would use (the SVD basis computed once, so
    that callers applying it many times pay for it once)."""
    if method == "auto":
        method = _auto_method(operator)
    if method not in ("projection", "dense", "cg"):
        raise ValueError(f"unknown null-space method {method!r}")
    rows = _row_space_basis(operator, device) if method == "dense" else None
    return RowSpaceProjector(operator, method, rows, iterations, tolerance)


def _measured_index(operator: Operator, device: torch.device) -> torch.Tensor:
    mask = getattr(operator, "mask", None)
    size = int(np.prod(operator.measurement_shape))
    if mask is None:
        return torch.arange(size, device=device)
    full = torch.ones(operator.measurement_shape, device=device) * mask
    return full.flatten().nonzero().flatten()


def dense_matrix(operator: Operator, device: torch.device, batch: int = 256) -> torch.Tensor:
    """A as an explicit float64 [measured entries, C·H·W] matrix (A applied to the basis)."""
    n = int(np.prod(operator.image_shape))
    index = _measured_index(operator, device)
    columns = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        basis = torch.zeros(stop - start, n, device=device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        y = operator.A(basis.view(-1, *operator.image_shape)).flatten(1)
        columns.append(y[:, index].double())
    return torch.cat(columns).T


def _row_space_basis(operator: Operator, device: torch.device) -> torch.Tensor:
    """An orthonormal basis of the row space of A, float64 [rank, C·H·W], from the SVD."""
    matrix = dense_matrix(operator, device)
    _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    cutoff = s.max() * SINGULAR_RTOL
    return vh[s > cutoff]


def _cg_row_space_projection(
    operator: Operator, d: torch.Tensor, iterations: int, tolerance: float
) -> tuple[torch.Tensor, int]:
    """Conjugate gradients on the normal equations A*A w = A*A d in their CGLS form (residuals
    kept in measurement space, which loses less to rounding than forming A*A p), batched;
    vectors in float64, the operator in its own precision."""

    def forward(v: torch.Tensor) -> torch.Tensor:
        return operator.project(operator.A(v.to(d.dtype))).double()

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return operator.A_adjoint(y.to(d.dtype)).double()

    def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *([1] * (like.dim() - 1)))

    w = torch.zeros_like(d, dtype=torch.float64)
    s = forward(d.double())  # measurement residual A d − A w
    r = adjoint(s)
    p = r.clone()
    rr = r.flatten(1).pow(2).sum(1)
    stop = (tolerance * rr.sqrt()) ** 2
    used = 0
    for step in range(1, iterations + 1):
        if bool((rr <= stop).all()):
            break
        used = step
        q = forward(p)
        qq = q.flatten(1).pow(2).sum(1)
        active = (rr > stop) & (qq > 0)
        alpha = torch.where(active, rr / qq.clamp_min(_TINY), 0.0)
        w = w + per_sample(alpha, p) * p
        s = s - per_sample(alpha, q) * q
        r = adjoint(s)
        rr_new = r.flatten(1).pow(2).sum(1)
        beta = torch.where(active, rr_new / rr.clamp_min(_TINY), 0.0)
        p = r + per_sample(beta, p) * p
        rr = torch.where(active, rr_new, rr)
    return w.to(d.dtype), used


def smallest_directions(
    operator: Operator,
    count: int,
    device: torch.device,
    iterations: int = 100,
    seed: int = 0,
) -> Directions:
    """The `count` unit images v with the smallest non-zero ‖Av‖ (see the module): exact from
    the SVD for small images, block power iteration on cI − G otherwise (G the smaller Gram
    operator), with a Rayleigh–Ritz step at the end. The singular values returned are measured
    as ‖Av‖, so an unconverged direction is still described exactly."""
    image_shape = tuple(operator.image_shape)
    if count < 1:
        return Directions(torch.zeros(0, *image_shape, device=device), [], 0, True)
    if int(np.prod(image_shape)) <= DENSE_MAX_UNKNOWNS:
        return _dense_directions(operator, count, device)
    gram, to_image, size = _gram_on_smaller_side(operator, device)
    block = min(size, count + _EXTRA_BLOCK)
    generator = torch.Generator().manual_seed(seed)
    # the basis stays in float64 (the operator runs in float32): exact null directions then
    # have Ritz values far below the cut-off instead of float32 rounding noise
    basis = torch.linalg.qr(
        torch.randn(size, block, generator=generator, dtype=torch.float64).to(device)
    )[0]
    # c ≥ λ_max(G): a few power steps on G, with a margin
    top = basis[:, :1]
    for _ in range(_POWER_STEPS):
        top = gram(top)
        top = top / top.norm().clamp_min(_TINY)
    shift = 1.05 * float((top * gram(top)).sum())
    previous = None
    converged = False
    with torch.no_grad():
        for _ in range(iterations):
            basis = torch.linalg.qr(shift * basis - gram(basis))[0]
            ritz = torch.linalg.eigvalsh(basis.T @ gram(basis))
            # stop once every Ritz value settles (relative to itself, or below rounding)
            if previous is not None and bool(
                ((ritz - previous).abs() <= 1e-3 * ritz.abs() + 1e-7 * shift).all()
            ):
                converged = True
                break
            previous = ritz
        values, rotation = torch.linalg.eigh(basis.T @ gram(basis))
        vectors = basis @ rotation  # ascending Ritz values of G
    kept = [i for i in range(block) if float(values[i]) > SINGULAR_RTOL**2 * shift]
    nulls = block - len(kept)
    images = []
    for i in kept[:count]:
        v = to_image(vectors[:, i])
        images.append(v / v.norm().clamp_min(_TINY))
    if not images:
        return Directions(torch.zeros(0, *image_shape, device=device), [], nulls, converged)
    stacked = torch.stack(images)
    with torch.no_grad():
        sigmas = operator.norm(operator.A(stacked)).tolist()
    return Directions(stacked, sigmas, nulls, converged)


def _gram_on_smaller_side(
    operator: Operator, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], int]:
    """G as a map on columns [size, b], and the map from a column to an image [C, H, W]."""
    image_shape = tuple(operator.image_shape)
    n = int(np.prod(image_shape))
    index = _measured_index(operator, device)
    m = int(index.numel())
    total = int(np.prod(operator.measurement_shape))

    def to_measurements(u: torch.Tensor) -> torch.Tensor:  # [m, b] -> [b, *measurement_shape]
        full = torch.zeros(u.shape[1], total, device=device, dtype=u.dtype)
        full[:, index] = u.T
        return full.view(-1, *operator.measurement_shape)

    if m < n:

        def gram(u: torch.Tensor) -> torch.Tensor:
            images = operator.A_adjoint(to_measurements(u.float()))
            return operator.A(images).flatten(1)[:, index].T.double()

        def to_image(u: torch.Tensor) -> torch.Tensor:
            return operator.A_adjoint(to_measurements(u[:, None].float()))[0]

        return gram, to_image, m

    def gram_images(v: torch.Tensor) -> torch.Tensor:
        images = v.T.reshape(-1, *image_shape).float()
        return operator.A_adjoint(operator.A(images)).flatten(1).T.double()

    return gram_images, lambda v: v.view(image_shape).float(), n


def _dense_directions(operator: Operator, count: int, device: torch.device) -> Directions:
    """Small images: the exact smallest non-zero singular directions from the SVD."""
    matrix = dense_matrix(operator, device)
    _, s, vh = torch.linalg.svd(matrix, full_matrices=True)
    n = matrix.shape[1]
    singular = torch.zeros(n, dtype=s.dtype, device=s.device)
    singular[: s.numel()] = s
    nonzero = (singular > singular.max() * SINGULAR_RTOL).nonzero().flatten()
    chosen = nonzero.flip(0)[:count]  # svd sorts descending: smallest non-zero last
    vectors = vh[chosen].to(torch.float32).view(-1, *operator.image_shape)
    with torch.no_grad():
        sigmas = operator.norm(operator.A(vectors)).tolist() if len(chosen) else []
    return Directions(vectors, sigmas, n - int(nonzero.numel()), True)
