"""Every certified figure is at least the worst change any search finds (random points of the
ball and projected gradient ascent), on random small networks of the supported layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.engine.bounds.nets import ConvResidual, Dense, TinyUNet, randomise_batch_norm
from tests.engine.bounds.search import found_worst
from workers.engine.bounds import (
    Certificate,
    Crown,
    LinearMap,
    ball,
    box,
    certify_output_change,
    ibp,
    through_linear_map,
    trace,
)

NETWORKS = {
    "residual": lambda c: ConvResidual(c),
    "residual-leaky": lambda c: ConvResidual(c, leaky=0.1),
    "unet-maxpool-transposed": lambda c: TinyUNet(c, "max", "transposed"),
    "unet-avgpool-bilinear-leaky": lambda c: TinyUNet(c, "avg", "bilinear", leaky=0.05),
    "unet-maxpool-nearest": lambda c: TinyUNet(c, "max", "nearest"),
}
CASES = [  # (seed, image size, channels)
    (0, 8, 2),
    (1, 8, 4),
    (2, 16, 3),
]


def _check(certificate: Certificate | object, found: float) -> Certificate:
    assert isinstance(certificate, Certificate), certificate
    for method, figure in certificate.figures.items():
        assert figure >= found, f"{method}: {figure} < found {found}"
    return certificate


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize(("seed", "size", "channels"), CASES)
@pytest.mark.parametrize(("norm", "eps"), [("l2", 0.05), ("l2", 1.0), ("linf", 0.05)])
def test_every_figure_is_above_the_worst_change_found(
    name: str, seed: int, size: int, channels: int, norm: str, eps: float
) -> None:
    torch.manual_seed(seed)
    model = randomise_batch_norm(NETWORKS[name](channels), seed)
    x = torch.randn(1, 1, size, size)
    certificate = certify_output_change(model, ball(x, eps, norm))
    _check(certificate, found_worst(model, x, eps, norm, seed=seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_crown_intermediate_bounds_are_sound_and_no_looser(seed: int) -> None:
    """Intermediate bounds from CROWN itself: sound, and no looser than from IBP."""
    torch.manual_seed(seed)
    model = randomise_batch_norm(TinyUNet(3, "max", "transposed", leaky=0.1), seed)
    x = torch.randn(1, 1, 8, 8)
    inputs = ball(x, 0.3, "l2")
    found = found_worst(model, x, 0.3, "l2", seed=seed)
    from_ibp = _check(certify_output_change(model, inputs), found)
    from_crown = _check(certify_output_change(model, inputs, intermediate="crown"), found)
    assert from_crown.figures["crown"] <= from_ibp.figures["crown"] * (1 + 1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_classifier_head_with_batch_norm(seed: int) -> None:
    torch.manual_seed(seed)
    model = randomise_batch_norm(Dense(64, 24, 10), seed)
    x = torch.randn(1, 1, 8, 8)
    for norm, eps in (("l2", 0.2), ("linf", 0.02)):
        found = found_worst(model, x, eps, norm, seed=seed)
        _check(certify_output_change(model, ball(x, eps, norm)), found)


def _operator(seed: int, m: int = 24, n: int = 64) -> tuple[torch.Tensor, LinearMap]:
    """A random m×n measurement matrix A, and the adjoint model input A*(y + e)."""
    a = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = a / m**0.5

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return (y.reshape(y.shape[0], m).to(torch.float64) @ a).view(-1, 1, 8, 8)

    return a, LinearMap.from_function(adjoint, (m,))


def test_a_linear_model_behind_the_adjoint_gets_the_composed_sigma_max() -> None:
    torch.manual_seed(7)
    a, adjoint = _operator(7)
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=True)).double()
    y = torch.randn(1, 24, dtype=torch.float64)
    j = torch.autograd.functional.jacobian(model, adjoint.fn(y)).reshape(64, 64)
    exact = float(torch.linalg.matrix_norm(j @ a.T, ord=2)) * 0.1
    certificate = certify_output_change(model, through_linear_map(adjoint, y, 0.1))
    assert isinstance(certificate, Certificate)
    assert exact <= certificate.upper <= exact * (1 + 1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_an_adjoint_input_model_in_measurement_space(seed: int, norm: str) -> None:
    """The perturbation lives in measurement space and passes through A* first."""
    torch.manual_seed(seed)
    _, adjoint = _operator(seed)
    model = randomise_batch_norm(TinyUNet(3, "max", "transposed"), seed)
    y = torch.randn(1, 24, dtype=torch.float64)
    eps = 0.1 * float(y.norm()) if norm == "l2" else 0.05
    found = found_worst(model, y, eps, norm, into=adjoint.fn, seed=seed)
    _check(certify_output_change(model, through_linear_map(adjoint, y, eps, norm)), found)


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_per_coordinate_bounds_hold_at_every_sampled_point(
    name: str, intermediate: str, norm: str
) -> None:
    """Sharper than the norm: every output coordinate at every sampled e (the ball's boundary,
    its inside, and the search's ascent points) lies within IBP's interval and between CROWN's
    two linear functions."""
    torch.manual_seed(11)
    model = randomise_batch_norm(NETWORKS[name](3), 11)
    x = torch.randn(1, 1, 8, 8)
    eps = 0.4 if norm == "l2" else 0.05
    inputs = ball(x, eps, norm)
    _, graph = trace(model, tuple(x.shape))
    lo, hi = (t.reshape(-1) for t in ibp(graph, inputs)[graph.output])
    crown = Crown(graph, inputs, intermediate=intermediate)
    lin = crown.linear(graph.output, torch.arange(lo.numel()))
    net = model.double().eval()
    generator = torch.Generator().manual_seed(12)
    e = torch.randn(200, 1, 8, 8, generator=generator, dtype=torch.float64)
    if norm == "l2":
        e = e / e.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
        e = e * torch.rand(200, 1, 1, 1, generator=generator, dtype=torch.float64) ** 0.1
    else:
        e = eps * e.sign() * (torch.rand(200, 1, 8, 8, generator=generator) > 0.2).double()
    with torch.no_grad():
        out = net(x.double() + e).flatten(1)
    flat = e.flatten(1)
    below = flat @ lin.lower.T + lin.lower_bias
    above = flat @ lin.upper.T + lin.upper_bias
    assert bool((lo <= out).all()) and bool((out <= hi).all())
    assert bool((below <= out).all()) and bool((out <= above).all())


def test_an_input_box_bounds_every_sampled_point() -> None:
    """A box [lo, hi] (per-pixel widths): the ℓ∞ ball of radius 1 through diag((hi − lo)/2)."""
    torch.manual_seed(13)
    model = randomise_batch_norm(TinyUNet(3, "max", "transposed", leaky=0.1), 13)
    x = torch.randn(1, 1, 8, 8)
    widths = 0.1 * torch.rand(1, 1, 8, 8)
    inputs = box(x - widths, x + widths)
    _, graph = trace(model, tuple(x.shape))
    crown = Crown(graph, inputs, intermediate="crown")
    lo, hi = crown.linear(graph.output, torch.arange(64)).concretise(inputs)
    net = model.double().eval()
    u = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    points = x.double() + (2 * u - 1).sign() * widths.double()  # corners of the box
    with torch.no_grad():
        out = net(points).flatten(1)
    assert bool((lo <= out).all()) and bool((out <= hi).all())
    certificate = certify_output_change(model, inputs)
    assert isinstance(certificate, Certificate)
    with torch.no_grad():
        change = (out - net(x.double()).flatten(1)).norm(dim=1).max()
    assert certificate.upper >= float(change)
