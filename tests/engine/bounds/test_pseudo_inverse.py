"""U = exact = L on linear reconstructions: the pseudo-inverse A⁺ of every kind of reference
operator, perturbed in measurement space and in image space.

For a linear Ψ the worst change over an ℓ2 ball of radius ε is ε·σ_max of the map from the
perturbation to the output: σ_max(A⁺) = 1/σ_min(A) (its smallest kept singular value) in
measurement space, σ_max(A⁺A) = 1 (an orthogonal projection) in image space. The certified U must
match it up to its margins, and the gradient search must find it (it is a power iteration on a
linear map). Over an ℓ∞ ball of at most 12 entries the exact value is the largest ‖A⁺ s‖₂ over
the sign vectors s, which U computes too.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from schemas import operators as ops
from tests.engine.bounds.search import found_worst
from workers.engine.bounds import (
    Certificate,
    LinearMap,
    ball,
    certify_output_change,
    through_linear_map,
)
from workers.engine.nullspace import SINGULAR_RTOL, dense_matrix
from workers.engine.operators import build_operator

OPERATORS = {
    "gaussian": (ops.GaussianOperator(m=24, seed=1), (1, 8, 8)),
    "inpainting": (ops.InpaintingOperator(fraction=0.5, seed=2), (1, 8, 8)),
    "blur": (ops.BlurOperator(sigma=1.0, size=3), (1, 8, 8)),  # σ_min(A) ≈ 0.004
    "denoising": (ops.DenoisingOperator(), (1, 4, 4)),
    "mri-complex": (ops.MRIOperator(acceleration=2, center_fraction=0.25), (2, 8, 8)),
    "mri-real": (ops.MRIOperator(acceleration=2, center_fraction=0.25), (1, 8, 8)),
    "radon": (ops.RadonOperator(angles=6), (1, 8, 8)),  # rank-deficient: A⁺ truncates
}
# Measurement space: the margins add about 1e-8 relative. Image space: the slack that covers
# the rounding of c = A x travels through A⁺, whose entries reach 10² for blur: up to 1e-5.
TIGHT = {"measurements": 1e-6, "image": 1e-5}
SEARCH = 1e-3  # the search's shortfall on a linear map (power iteration, 60 steps)


def _sigma(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def _pseudo_inverse(name: str) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """A (float64, on the measured entries), A⁺ (singular values below SINGULAR_RTOL of the
    largest dropped, as the engine's null-space code does) and Ψ(y) = A⁺ y as a model."""
    config, shape = OPERATORS[name]
    operator = build_operator(config, shape)
    a = dense_matrix(operator, torch.device("cpu"))
    pinv = torch.linalg.pinv(a, rtol=SINGULAR_RTOL)
    model = nn.Linear(*a.shape, bias=False).double()
    model.weight.data = pinv.clone()
    return a, pinv, model


def _certify(model: nn.Module, inputs) -> Certificate:
    certificate = certify_output_change(model, inputs)
    assert isinstance(certificate, Certificate), certificate
    return certificate


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_the_pseudo_inverse_in_measurement_space(name: str) -> None:
    a, pinv, model = _pseudo_inverse(name)
    x = torch.rand(1, a.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x @ a.T
    eps = 0.05 * float(y.norm())
    exact = _sigma(pinv) * eps
    certificate = _certify(model, ball(y, eps))
    assert certificate.method == "crown_linear"
    assert exact <= certificate.upper <= exact * (1 + TIGHT["measurements"])
    found = found_worst(model, y, eps)
    assert exact * (1 - SEARCH) <= found <= exact * (1 + 1e-12)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_the_pseudo_inverse_in_image_space_is_a_projection(name: str) -> None:
    """Ψ(A(x + r)) − Ψ(A x) = A⁺A r: an orthogonal projection, so the worst change is ε."""
    a, pinv, model = _pseudo_inverse(name)
    n = a.shape[1]
    x = torch.rand(1, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    forward = LinearMap(lambda v: v @ a.T, a, (n,), (a.shape[0],))
    eps = 0.05 * float(x.norm())
    exact = _sigma(pinv @ a) * eps
    assert exact == pytest.approx(eps, rel=1e-9)
    certificate = _certify(model, through_linear_map(forward, x, eps))
    assert exact <= certificate.upper <= exact * (1 + TIGHT["image"])
    found = found_worst(model, x, eps, into=forward.fn)
    assert exact * (1 - SEARCH) <= found <= exact * (1 + 1e-12)


def test_zero_filling_through_the_operators_own_adjoint() -> None:
    """MRI on complex images: A⁺ is zero filling, A* itself (A A* = I on the measured entries).
    The model is the identity behind the operator's own adjoint (an `adjoint` model with Ψ = id),
    its matrix built column by column from the FFT-based A*."""
    operator = build_operator(*OPERATORS["mri-complex"])
    assert operator.mask is not None
    measured = torch.ones(operator.measurement_shape) * operator.mask.cpu()
    index = measured.flatten().nonzero().flatten()
    full = measured.numel()

    def adjoint(v: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(v.shape[0], full, dtype=torch.float32)
        y[:, index] = v.float()
        return operator.A_adjoint(y.view(-1, *operator.measurement_shape)).double()

    linear_map = LinearMap.from_function(adjoint, (len(index),))
    exact_gain = _sigma(linear_map.matrix)
    assert exact_gain == pytest.approx(1.0, rel=1e-6)  # A* is an isometry on measured entries
    y = torch.randn(1, len(index), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 0.02 * float(y.norm())
    certificate = _certify(nn.Identity(), through_linear_map(linear_map, y, eps))
    exact = exact_gain * eps
    assert exact <= certificate.upper <= exact * (1 + TIGHT["measurements"])


def test_an_linf_ball_of_few_measurements_gets_the_exact_sign_vector_figure() -> None:
    """10 Gaussian measurements of a 4×4 image: max over the cube of ‖A⁺ e‖₂ is at a vertex,
    brute force over the 2¹⁰ sign vectors here; U takes the same maximum (with its margins)."""
    operator = build_operator(ops.GaussianOperator(m=10, seed=3), (1, 4, 4))
    a = dense_matrix(operator, torch.device("cpu"))
    pinv = torch.linalg.pinv(a, rtol=SINGULAR_RTOL)
    model = nn.Linear(*a.shape, bias=False).double()
    model.weight.data = pinv.clone()
    y = torch.randn(1, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 0.03
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=10)), dtype=torch.float64)
    exact = float((signs @ pinv.T).norm(dim=1).max()) * eps
    certificate = _certify(model, ball(y, eps, "linf"))
    assert exact <= certificate.upper <= exact * (1 + TIGHT["measurements"])
    # the per-coordinate figures are looser: they assume every output row gets its own signs
    assert certificate.figures["crown"] > exact * (1 + 1e-3)
    found = found_worst(model, y, eps, "linf")
    assert exact * (1 - SEARCH) <= found <= exact * (1 + 1e-12)
