"""The certified local Lipschitz constant U ≥ sup ‖J_Ψ K‖₂ over the ball: against the exact value
on small ReLU networks (the largest Jacobian norm over the activation patterns whose regions meet
the ball), against every sampled Jacobian on the convolutional test networks, exact on linear
ones and on the needle network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.engine.bounds.exact_relu import (
    exact_lipschitz,
    interval_bounds,
    layers_of,
    random_network,
)
from tests.engine.bounds.needle import needle_case
from tests.engine.bounds.nets import ConvResidual, LinearOnly, TinyUNet, randomise_batch_norm
from workers.engine.bounds import (
    Certificate,
    LinearMap,
    Unbounded,
    ball,
    certify_lipschitz,
    through_linear_map,
)

SMALL_CASES = 40


def _sigma(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def _certify(model: nn.Module, inputs, intermediate: str = "ibp") -> Certificate:
    certificate = certify_lipschitz(model, inputs, intermediate=intermediate)
    assert isinstance(certificate, Certificate), certificate
    return certificate


def _small_case(seed: int):
    """A random network of at most 6 ReLUs on 2 or 3 inputs (K in front for one case in four),
    an ℓ∞ ball, and the exact Lipschitz constant over it (nonzero: constant networks are
    redrawn)."""
    rng = np.random.default_rng([2027, seed])
    while True:
        d = int(rng.integers(2, 4))
        if rng.random() < 0.5:
            widths: tuple[int, ...] = (int(rng.integers(2, 7)),)
        else:
            widths = (int(rng.integers(2, 4)), int(rng.integers(2, 4)))
        model = random_network(rng, d, widths, int(rng.integers(1, 4)))
        K = rng.normal(size=(d, d)) if seed % 4 == 3 else None
        y = rng.normal(size=d)
        eps = float(np.exp(rng.uniform(math.log(0.02), math.log(2.0))))
        layers = layers_of(model, K)
        exact = exact_lipschitz(layers, y - eps, y + eps)
        if exact > 1e-9:
            return model, layers, K, y, eps, exact


def test_the_bound_is_above_the_exact_lipschitz_constant_of_small_relu_networks() -> None:
    ratios, stable_count = [], 0
    for seed in range(SMALL_CASES):
        model, layers, K, y, eps, exact = _small_case(seed)
        point = torch.from_numpy(y)[None]
        if K is None:
            inputs = ball(point, eps, "linf")
            k = torch.eye(y.size, dtype=torch.float64)
        else:
            k = torch.from_numpy(K)
            linear_map = LinearMap(lambda v, k=k: v @ k.T, k, (y.size,), (y.size,))
            inputs = through_linear_map(linear_map, point, eps, "linf")
        # the enumeration is at least every Jacobian at a sampled point of the ball
        rng = np.random.default_rng([8, seed])
        for e in eps * rng.uniform(-1, 1, size=(16, y.size)):
            z = (point + torch.from_numpy(e)[None]) @ k.T
            jacobian = torch.autograd.functional.jacobian(model, z).reshape(-1, y.size) @ k
            assert _sigma(jacobian) <= exact * (1 + 1e-9), seed
        for intermediate in ("ibp", "crown"):
            certificate = _certify(model, inputs, intermediate)
            for method, figure in certificate.figures.items():
                assert figure >= exact, f"seed {seed}, {intermediate}, {method}: {figure} < {exact}"
        ratios.append(certificate.upper / exact)
        if all(
            bool(((lo >= 0) | (hi <= 0)).all())
            for lo, hi in interval_bounds(layers, y - eps, y + eps)
        ):  # affine on the ball: a single Jacobian, which U gives up to its margins
            stable_count += 1
            assert certificate.upper <= exact * (1 + 1e-6), seed
    assert stable_count >= 5
    assert float(np.mean(ratios)) <= 1.3, float(np.mean(ratios))


NETWORKS = {
    "unet-maxpool-transposed": lambda: TinyUNet(3, "max", "transposed"),
    "unet-avgpool-bilinear-leaky": lambda: TinyUNet(3, "avg", "bilinear", leaky=0.1),
    "unet-maxpool-nearest-leaky": lambda: TinyUNet(2, "max", "nearest", leaky=0.05),
    "residual": lambda: ConvResidual(4),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize(("norm", "eps"), [("l2", 0.5), ("linf", 0.05)])
def test_the_bound_is_above_every_sampled_jacobian(name: str, norm: str, eps: float) -> None:
    torch.manual_seed(3)
    model = randomise_batch_norm(NETWORKS[name](), 3)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    net = model.double().eval()
    generator = torch.Generator().manual_seed(4)
    e = torch.randn(12, 1, 8, 8, generator=generator, dtype=torch.float64)
    if norm == "l2":
        e = eps * e / e.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        e = e * torch.rand(12, 1, 1, 1, generator=generator, dtype=torch.float64)
    else:
        e = eps * e.sign() * (torch.rand(12, 1, 8, 8, generator=generator) > 0.3).double()
    sampled = max(
        _sigma(torch.autograd.functional.jacobian(net, x + e[k : k + 1]).reshape(64, 64))
        for k in range(12)
    )
    for intermediate in ("ibp", "crown"):
        certificate = _certify(model, ball(x, eps, norm), intermediate)
        assert certificate.upper >= sampled, (intermediate, certificate.figures, sampled)


def test_a_small_ball_gets_the_jacobian_norm_at_its_centre() -> None:
    """ε = 1e-4: no ReLU of the U-Net switches on the ball, U is σ_max(J(x))."""
    torch.manual_seed(5)
    model = randomise_batch_norm(TinyUNet(3, "max", "transposed"), 5)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    exact = _sigma(torch.autograd.functional.jacobian(model.double().eval(), x).reshape(64, 64))
    certificate = _certify(model, ball(x, 1e-4))
    assert exact <= certificate.upper <= exact * (1 + 1e-6)


def test_behind_an_adjoint_the_bound_covers_the_composed_jacobian() -> None:
    """The model reads A*(y + e): the Lipschitz constant of e ↦ Ψ(A*(y + e)), J·A*."""
    a = (
        torch.randn(24, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        / 24**0.5
    )

    def adjoint(v: torch.Tensor) -> torch.Tensor:
        return (v.reshape(v.shape[0], 24) @ a).view(-1, 1, 8, 8)

    linear_map = LinearMap.from_function(adjoint, (24,))
    torch.manual_seed(6)
    model = randomise_batch_norm(TinyUNet(3, "max", "transposed"), 6)
    net = model.double().eval()
    y = torch.randn(1, 24, dtype=torch.float64)
    eps = 0.1 * float(y.norm())
    generator = torch.Generator().manual_seed(7)
    sampled = 0.0
    for _ in range(10):
        e = torch.randn(1, 24, generator=generator, dtype=torch.float64)
        e = eps * e / e.norm() * float(torch.rand(1, generator=generator))
        jacobian = torch.autograd.functional.jacobian(net, adjoint(y + e)).reshape(64, 64)
        sampled = max(sampled, _sigma(jacobian @ a.T))
    certificate = _certify(model, through_linear_map(linear_map, y, eps), "crown")
    assert certificate.upper >= sampled


def test_linear_networks_get_sigma_max() -> None:
    torch.manual_seed(8)
    model = randomise_batch_norm(LinearOnly(), 8)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    exact = _sigma(torch.autograd.functional.jacobian(model.double().eval(), x).reshape(64, 64))
    certificate = _certify(model, ball(x, 1.0))  # any radius: the Jacobian is constant
    assert exact <= certificate.upper <= exact * (1 + 1e-6)


def test_the_needle_gets_its_exact_local_lipschitz_constant() -> None:
    """Inside the cap Ψ has Jacobian I + c v vᵀ, of norm 1 + c (tests/engine/bounds/needle.py):
    the local Lipschitz constant over the ball, which the interval Jacobian I + [0, c] v vᵀ
    reaches exactly (its centre and radius norms add up to 1 + c/2 + c/2)."""
    model, y0, eps, _ = needle_case()
    certificate = _certify(model, ball(y0, eps))
    assert 1 + model.gain <= certificate.upper <= (1 + model.gain) * (1 + 1e-6)


def test_unsupported_layers_are_named() -> None:
    x = torch.randn(1, 1, 8, 8)
    gelu = certify_lipschitz(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU()), ball(x, 0.1))
    assert isinstance(gelu, Unbounded) and "GELU" in gelu.reason
    ceil = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True))
    pooled = certify_lipschitz(ceil, ball(x, 0.1))
    assert isinstance(pooled, Unbounded) and "ceil_mode" in pooled.reason
