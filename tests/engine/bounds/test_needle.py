"""The needle network (tests/engine/bounds/needle.py): worst Lipschitz ratio 2.93 from the clean
input, through a narrow cap the gradient never sees; every search reports 1.00. The certified
bracket [found, U] contains 2.93, and a gate below 2.93 cannot be proven."""

from __future__ import annotations

import pytest
import torch

from schemas import operators as ops
from tests.engine.bounds.needle import (
    DEPTH,
    RATIO,
    exact_worst_change,
    gate,
    needle_case,
    random_in_cap,
)
from tests.engine.bounds.search import found_worst
from workers.engine.attacks import SearchSettings, ThreatModel, worst_case_search
from workers.engine.bounds import Certificate, ball, certify_output_change
from workers.engine.context import Subject
from workers.engine.operators import build_operator

LEVEL = 0.05  # ε = δ‖y₀‖, as a worst_case level


def _change(model, y0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(y0 + e) - model(y0)).flatten(1).norm(dim=1)


def test_the_needle_has_its_analytic_answer_and_the_identity_at_the_clean_input() -> None:
    model, y0, eps, v = needle_case(level=LEVEL)
    exact = exact_worst_change(eps)
    # reached at e = εv …
    assert float(_change(model, y0, eps * v)) == pytest.approx(exact, rel=1e-12)
    # … and nowhere above it: the cap itself, the sphere, the ball's inside
    generator = torch.Generator().manual_seed(1)
    cap = random_in_cap(v, eps, DEPTH, 2000, generator)
    assert float(_change(model, y0, cap).max()) <= exact * (1 + 1e-12)
    assert float(_change(model, y0, cap).max()) > eps * 1.01  # the cap is where it switches on
    sphere = torch.randn(2000, *y0.shape[1:], generator=generator, dtype=torch.float64)
    sphere = eps * sphere / sphere.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert float(_change(model, y0, sphere).max()) == pytest.approx(eps, rel=1e-12)
    # the Jacobian at y₀ is the identity: every direction a gradient sees has gain 1.00
    jacobian = torch.autograd.functional.jacobian(model, y0).reshape(y0.numel(), y0.numel())
    assert torch.equal(jacobian, torch.eye(y0.numel(), dtype=torch.float64))


def test_the_searches_report_one() -> None:
    """The bounds tests' search (random points, projected gradient ascent) and the engine's own
    default worst-case search (float32, as an audit runs it, the needle as a denoiser)."""
    model, y0, eps, _ = needle_case(level=LEVEL)
    assert found_worst(model, y0, eps) / eps == pytest.approx(1.0, abs=1e-9)
    operator = build_operator(ops.DenoisingOperator(), tuple(y0.shape[1:]))
    subject = Subject("model", model.float())
    threat = ThreatModel(levels=(LEVEL,), target="reconstruction")
    (outcome,) = worst_case_search(
        subject, operator, y0.float(), y0.float(), threat, SearchSettings(), [0]
    )
    e = outcome.perturbation.double()
    ratio = float(_change(model.double(), y0, e)) / eps
    assert ratio == pytest.approx(1.0, abs=1e-6)


def test_the_certified_bracket_contains_the_needle_and_a_gate_below_it_stays_open() -> None:
    model, y0, eps, _ = needle_case(level=LEVEL)
    found = found_worst(model, y0, eps) / eps
    # the default (IBP intermediate bounds: a box around the ℓ2 ball, so ⟨v, e⟩ looks up to
    # ε‖v‖₁ ≈ 6ε) is sound but loose; CROWN's own intermediate bounds see the ball
    default = certify_output_change(model, ball(y0, eps))
    tight = certify_output_change(model, ball(y0, eps), intermediate="crown")
    assert isinstance(default, Certificate) and isinstance(tight, Certificate)
    for certificate in (default, tight):
        assert found <= RATIO <= certificate.upper / eps
    # with the exact intermediate bound of the one ReLU, its triangle relaxation is exact at
    # e = εv: U/ε = 1 + c(1 − depth) = 2.93 up to the margins
    assert tight.upper / eps == pytest.approx(RATIO, rel=1e-6)
    assert default.upper / eps > 5 * RATIO
    # a threshold of 2 on the Lipschitz ratio: the search alone would pass it (1.00 ≤ 2), the
    # bracket cannot prove it (U ≥ 2.93), and the truth is above it
    assert found <= 2.0
    assert gate(found, tight.upper / eps, 2.0) == "open"
    assert gate(found, tight.upper / eps, 3.0) == "proven"
