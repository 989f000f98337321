"""Bounds on networks whose worst output change is known exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tests.engine.bounds.nets import LinearOnly, randomise_batch_norm
from workers.engine.bounds import Certificate, ball, certify_output_change, spectral_norm_upper
from workers.engine.bounds import figure as figure_module

TIGHT = 1e-6  # the margins loosen a figure by far less than this, relative


def _sigma(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.detach().double(), ord=2))


def _jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net = model.double().eval()
    j = torch.autograd.functional.jacobian(net, x.double())
    return j.reshape(net(x.double()).numel(), x.numel())


def _certify(model: nn.Module, x: torch.Tensor, eps: float, norm: str = "l2") -> Certificate:
    certificate = certify_output_change(model, ball(x, eps, norm))
    assert isinstance(certificate, Certificate), certificate
    return certificate


def test_a_linear_layer_gets_sigma_max_times_epsilon() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(30, 20)
    x = torch.randn(1, 30)
    exact = _sigma(layer.weight) * 0.1
    certificate = _certify(layer, x, 0.1)
    assert certificate.method == "crown_linear"
    assert exact <= certificate.upper <= exact * (1 + TIGHT)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_network_of_affine_layers_gets_sigma_max_of_its_jacobian(seed: int) -> None:
    """Transposed convolution, average pooling, bilinear resizing, concatenation, batch norm,
    scaling and subtraction: all affine, so U = σ_max(J)·ε exactly."""
    torch.manual_seed(seed)
    model = randomise_batch_norm(LinearOnly(), seed)
    x = torch.randn(1, 1, 8, 8)
    exact = _sigma(_jacobian(model, x)) * 0.05
    certificate = _certify(model, x, 0.05)
    assert exact <= certificate.upper <= exact * (1 + TIGHT)


@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_relus_that_never_switch_on_the_ball_give_the_linear_figure(slope: float) -> None:
    """Biases of ±50 keep every (leaky) ReLU on one side over the ball: the network is the
    linear map W₂ D W₁ there, and U is its σ_max·ε."""
    torch.manual_seed(3)
    first, second = nn.Linear(20, 16), nn.Linear(16, 10)
    signs = torch.tensor([1.0, -1.0]).repeat(8)
    first.bias.data = 50 * signs
    act = nn.LeakyReLU(slope) if slope else nn.ReLU()
    model = nn.Sequential(first, act, second)
    x = torch.randn(1, 20)
    d = torch.where(signs > 0, 1.0, slope)
    linear = second.weight.double() @ torch.diag(d).double() @ first.weight.double()
    exact = _sigma(linear) * 0.2
    certificate = _certify(model, x, 0.2)
    # the margins scale with the magnitude of the sums (biases of 50 against a change of 0.1)
    assert exact <= certificate.upper <= exact * (1 + 10 * TIGHT)


def test_linf_ball_gets_the_exact_linf_to_l2_norm() -> None:
    """max over the cube of ‖W e‖₂ is at a vertex: brute force over 2¹⁰ sign vectors, which the
    linear figure enumerates too (up to 12 perturbation entries)."""
    torch.manual_seed(4)
    layer = nn.Linear(10, 6)
    x = torch.randn(1, 10)
    eps = 0.03
    w = layer.weight.detach().double()
    exact = max(
        float(torch.linalg.vector_norm(w @ torch.tensor(signs, dtype=torch.float64)))
        for signs in itertools.product([-1.0, 1.0], repeat=10)
    )
    certificate = _certify(layer, x, eps, "linf")
    assert exact * eps <= certificate.upper <= exact * eps * (1 + TIGHT)


def test_spectral_norm_upper_is_above_sigma_max_and_tight() -> None:
    generator = torch.Generator().manual_seed(5)
    for shape in [(1, 7), (9, 9), (40, 13), (13, 40)]:
        m = torch.randn(*shape, generator=generator, dtype=torch.float64)
        sigma = float(torch.linalg.svdvals(m)[0])
        upper = spectral_norm_upper(m)
        assert sigma <= upper <= sigma * (1 + 1e-9)


def test_large_matrices_fall_back_to_certified_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the dimension where the Gram eigenvalue is computed: min(‖M‖_F, √(‖M‖₁‖M‖_∞))."""
    monkeypatch.setattr(figure_module, "MAX_EIG_DIMENSION", 4)
    m = torch.randn(30, 20, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    upper = spectral_norm_upper(m)
    frobenius = float(torch.linalg.matrix_norm(m))
    assert float(torch.linalg.svdvals(m)[0]) <= upper <= frobenius * (1 + 1e-9)
