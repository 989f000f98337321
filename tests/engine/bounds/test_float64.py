"""Rounding can only loosen the bounds: float64 throughout, and outward margins that cover
float64's own rounding where a naive evaluation would cut the exact value out."""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn

from workers.engine.bounds import Crown, InputSet, ball, box, ibp, trace


def _cancelling() -> tuple[nn.Module, torch.Tensor, Fraction]:
    """w·x = 10¹⁶ + 1 − 10¹⁶ at x = (1, 1, 1): exactly 1, but 0 in float64 (10¹⁶ + 1 rounds
    to 10¹⁶), and 0 in float32 too."""
    layer = nn.Linear(3, 1, bias=False).double()
    layer.weight.data = torch.tensor([[1e16, 1.0, -1e16]], dtype=torch.float64)
    x = torch.ones(1, 3, dtype=torch.float64)
    weights = layer.weight.detach()[0]
    exact = sum(Fraction(float(w)) * Fraction(float(v)) for w, v in zip(weights, x[0], strict=True))
    return layer, x, exact


def test_naive_float64_loses_the_exact_value() -> None:
    layer, x, exact = _cancelling()
    assert exact == 1
    assert float(layer(x).detach()) == 0.0  # what a bound without margins would start from


def test_interval_bounds_contain_the_exact_value_despite_cancellation() -> None:
    layer, x, exact = _cancelling()
    _, graph = trace(layer, (1, 3))
    lo, hi = ibp(graph, InputSet(x, 0.0, "linf"))[graph.output]
    assert Fraction(float(lo)) <= exact <= Fraction(float(hi))


def test_linear_bounds_contain_the_exact_value_despite_cancellation() -> None:
    layer, x, exact = _cancelling()
    _, graph = trace(layer, (1, 3))
    inputs = InputSet(x, 0.0, "l2")
    lo, hi = Crown(graph, inputs).linear(graph.output, torch.tensor([0])).concretise(inputs)
    assert Fraction(float(lo)) <= exact <= Fraction(float(hi))


def test_a_float32_model_is_bounded_in_float64() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 1))
    x = torch.randn(1, 1, 8, 8)  # float32, as the engine's models run
    gm, graph = trace(model, tuple(x.shape))
    assert all(p.dtype == torch.float64 for p in gm.parameters())
    bounds = ibp(graph, ball(x, 0.1))
    assert all(lo.dtype == hi.dtype == torch.float64 for lo, hi in bounds.values())
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_every_affine_step_widens_by_its_margin() -> None:
    """A point box (zero width) through an affine layer still gets a nonzero width: the margin."""
    layer = nn.Linear(4, 2).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    _, graph = trace(layer, (1, 4))
    lo, hi = ibp(graph, box(x, x))[graph.output]
    value = layer(x)
    assert bool((lo < value).all()) and bool((value < hi).all())
    assert bool(((hi - lo) <= 1e-8 * (1 + value.abs())).all())  # and only by a margin
