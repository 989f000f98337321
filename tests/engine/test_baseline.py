"""The TV and ℓ1-wavelet baselines: differentiable, better than the adjoint on a sparse image,
and stable under the worst-case search."""

from __future__ import annotations

import pytest
import torch

from schemas.checks import Baseline, WorstCaseCheck
from tests.engine.worst_case_fixtures import (
    MaskedFourierOperator,
    counting_subject,
    phantom,
    random_mask,
)
from workers.engine.baselines import build_baseline, operator_norm_squared
from workers.engine.context import AuditContext
from workers.engine.registry import get_check

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def operator() -> MaskedFourierOperator:
    return MaskedFourierOperator(random_mask(32, 0.35, seed=0))


def _relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x_hat - x).norm() / x.norm())


def test_operator_norm_of_a_masked_orthonormal_fft_is_one(operator: MaskedFourierOperator) -> None:
    assert operator_norm_squared(operator) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("kind", ["tv", "wavelet"])
def test_baseline_beats_the_adjoint_on_a_sparse_phantom(
    kind: str, operator: MaskedFourierOperator
) -> None:
    x = phantom(32, channels=2)
    y = operator.A(x)
    reconstruct = build_baseline(Baseline(kind=kind, **{"lambda": 0.03}, iterations=100), operator)
    adjoint_error = _relative_error(operator.A_adjoint(y), x)
    baseline_error = _relative_error(reconstruct(y), x)
    assert baseline_error < 0.75 * adjoint_error, (baseline_error, adjoint_error)


@pytest.mark.parametrize("kind", ["tv", "wavelet"])
def test_baseline_is_differentiable(kind: str, operator: MaskedFourierOperator) -> None:
    y = operator.A(phantom(32, channels=2)).requires_grad_(True)
    reconstruct = build_baseline(Baseline(kind=kind, iterations=10), operator)
    (gradient,) = torch.autograd.grad(reconstruct(y).pow(2).sum(), y)
    assert torch.isfinite(gradient).all()
    assert gradient.abs().sum() > 0


def test_tv_baseline_is_more_stable_than_an_unstable_linear_model() -> None:
    operator = MaskedFourierOperator(random_mask(16, 0.4, seed=2))
    images = torch.cat([phantom(16, channels=2), phantom(16, channels=2).flip(-1)])
    ctx = AuditContext(operator, images, torch.device("cpu"), seed=1, noise_level=0.0)
    # zero filling plus a large gain on one measured direction: amplification ≫ 1
    direction = operator.project(
        torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    )
    direction = direction / direction.norm()
    detail = phantom(16, channels=2).roll(5, dims=-1)

    def unstable(y: torch.Tensor) -> torch.Tensor:
        gain = 20.0 * (y * direction).flatten(1).sum(1)
        return operator.A_adjoint(y) + gain.view(-1, 1, 1, 1) * detail

    tv = build_baseline(Baseline(kind="tv", **{"lambda": 0.03}, iterations=30), operator)
    check = WorstCaseCheck(levels=[0.05], target="reconstruction", steps=8, restarts=1)
    worst_case = get_check("worst_case")
    found = {}
    for name, reconstruct in (("unstable", unstable), ("tv", tv)):
        subject = counting_subject(reconstruct, name="baseline" if name == "tv" else "model")
        report = worst_case.merge(check, [worst_case.run(check, ctx, subject, [0, 1], seed=0)])
        found[name] = report["levels"][0]["amplification"]["max"]
    # a 30-iteration TV solve is not exactly non-expansive: the ℓ2 ascent finds about 1.6
    assert found["tv"] < 2.0
    assert found["unstable"] > 5 * found["tv"], found
