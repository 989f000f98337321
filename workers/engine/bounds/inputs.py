"""The set of model inputs a bound covers: z = c + δ + K e, ‖e‖_p ≤ ε, |δ| ≤ s.

`e` lives in the perturbation space (measurements or images), `K` is the linear map that takes a
perturbation to the model's input (the identity when the model reads the perturbed vector
itself, the adjoint A* for a model that reads A*(y + e), A*A for an image-space perturbation of
such a model), `c` is the model's input at e = 0 and `s ≥ 0` is an elementwise slack that covers
the rounding of c = K·y. A box [lo, hi] is the ℓ∞ ball of radius 1 with K = diag((hi − lo)/2).

K is None (identity), a 1-D tensor (a diagonal) or a dense 2-D matrix [n_input, n_perturbation],
always float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Norm = Literal["l2", "linf"]
# relative slack on the rounding of a float64 matrix–vector product of inner dimension n:
# |fl(Kx) − Kx| ≤ n·u·|K||x| (u = 2⁻⁵³); n·u ≤ 1e-10 for n up to 9·10⁵. Documented margin.
GAMMA = 1e-10


@dataclass
class InputSet:
    center: torch.Tensor  # c: the model input at e = 0, shape [1, *input_shape], float64
    radius: float  # ε
    norm: Norm  # the ball's norm on e
    matrix: torch.Tensor | None = None  # K (None: identity)
    slack: torch.Tensor | None = None  # s ≥ 0, shaped like center (None: 0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.center.shape)

    @property
    def dual(self) -> float:
        """q with 1/p + 1/q = 1: sup_{‖e‖_p ≤ ε} a·e = ε‖a‖_q."""
        return 2.0 if self.norm == "l2" else 1.0

    @property
    def perturbation_size(self) -> int:
        if self.matrix is None or self.matrix.dim() == 1:
            return self.center.numel()
        return int(self.matrix.shape[1])

    def radii(self) -> torch.Tensor:
        """sup over the ball of |(K e)_i|: ε × the dual norm of K's row i, plus the slack."""
        if self.matrix is None:
            rows = torch.ones_like(self.center)
        elif self.matrix.dim() == 1:
            rows = self.matrix.abs().view_as(self.center)
        else:
            rows = torch.linalg.vector_norm(self.matrix, ord=self.dual, dim=1)
            rows = rows.view_as(self.center) * (1 + GAMMA)
        r = self.radius * rows
        return r if self.slack is None else r + self.slack

    def box(self) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.radii()
        return self.center - r, self.center + r

    def through(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Rows a of [S, n_input] as rows a·K of [S, n_perturbation]."""
        if self.matrix is None:
            return coefficients
        if self.matrix.dim() == 1:
            return coefficients * self.matrix.flatten()
        return coefficients @ self.matrix


def ball(center: torch.Tensor, radius: float, norm: Norm = "l2") -> InputSet:
    """The ball of radius ε around a model input x (the model reads x + e)."""
    c = _batched(center)
    return InputSet(c, float(radius), norm)


def box(lower: torch.Tensor, upper: torch.Tensor) -> InputSet:
    lo, hi = _batched(lower), _batched(upper)
    if bool((hi < lo).any()):
        raise ValueError("a box needs lower ≤ upper")
    c = (lo + hi) / 2
    half = (hi - lo) / 2
    # the rounded centre ± the rounded half-width must still contain [lo, hi]
    slack = GAMMA * (c.abs() + half)
    return InputSet(c, 1.0, "linf", half.flatten().clone(), slack)


@dataclass
class LinearMap:
    """A linear map from the perturbation space to the model input, with its dense matrix."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    matrix: torch.Tensor  # [n_out, n_in], float64
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @classmethod
    def from_function(
        cls,
        fn: Callable[[torch.Tensor], torch.Tensor],
        in_shape: tuple[int, ...],
        batch: int = 256,
    ) -> LinearMap:
        """The matrix of a linear torch function (batched over dim 0), column by column in
        float64: for small sizes only (n_in columns)."""
        n = math.prod(in_shape)
        columns = []
        out_shape: tuple[int, ...] = ()
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            basis = torch.zeros(stop - start, n, dtype=torch.float64)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            out = fn(basis.view(stop - start, *in_shape))
            out_shape = tuple(out.shape[1:])
            columns.append(out.reshape(stop - start, -1).to(torch.float64).T)
        return cls(fn, torch.cat(columns, dim=1), tuple(in_shape), out_shape)


def through_linear_map(
    linear_map: LinearMap, point: torch.Tensor, radius: float, norm: Norm = "l2"
) -> InputSet:
    """The model reads L(y + e): y a point of the perturbation space (measurements, say), L the
    operator's linear map (A* for an `adjoint` model), ‖e‖_p ≤ ε."""
    y = point.reshape(-1).to(torch.float64)
    K = linear_map.matrix
    c = (K @ y).view(1, *linear_map.out_shape)
    slack = GAMMA * (K.abs() @ y.abs()).view_as(c)
    return InputSet(c, float(radius), norm, K, slack)


def _batched(t: torch.Tensor) -> torch.Tensor:
    """A batch of one, float64 (the bound is for one input)."""
    if t.dim() == 0 or t.shape[0] != 1:
        raise ValueError(f"pass a batch of one input, shape [1, ...]; got {tuple(t.shape)}")
    return t.detach().to(torch.float64)
