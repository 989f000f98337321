"""The projected-ascent search against cases whose worst case is known exactly."""

from __future__ import annotations

import torch

from tests.engine.worst_case_fixtures import (
    DenseOperator,
    MaskedFourierOperator,
    linear_subject,
    random_mask,
    zero_filled_subject,
)
from workers.engine.attacks import SearchSettings, per_sample_norm, worst_case_search
from workers.engine.context import Subject

torch.set_num_threads(1)

IMAGE_SHAPE = (1, 4, 6)  # n = 24


def _linear_problem(seed: int = 0) -> tuple[DenseOperator, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    forward = torch.randn(16, 24, generator=gen)
    operator = DenseOperator(forward, IMAGE_SHAPE)
    x = torch.rand(3, *IMAGE_SHAPE, generator=gen)
    return operator, x, torch.randn(24, 16, generator=gen)


def test_linear_model_worst_case_reaches_top_singular_value() -> None:
    operator, x, recon = _linear_problem()
    subject = linear_subject(recon, IMAGE_SHAPE)
    y = operator.A(x)
    # momentum: Adam's coordinate-wise scaling has other fixed points on an ℓ2 sphere
    settings = SearchSettings(
        target="reconstruction", optimizer="momentum", steps=60, restarts=2, step_size=1.0
    )
    outcomes = worst_case_search(subject, operator, y, x, [0.05, 0.1], settings, seeds=[1, 2, 3])
    sigma_max = torch.linalg.svdvals(recon)[0]
    ratios = []
    for outcome in outcomes:
        e = outcome.perturbation
        ratios.append(per_sample_norm(subject.reconstruct(e)) / per_sample_norm(e))
        assert torch.all(ratios[-1] <= sigma_max * (1 + 1e-5))
    # the last level is warm-started from the first: every image is within 1 %
    assert torch.all(ratios[-1] >= 0.99 * sigma_max), (ratios, sigma_max)


def test_ball_constraint_and_measured_entries_only() -> None:
    operator = MaskedFourierOperator(random_mask(16, 0.3, seed=4))
    x = torch.rand(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    y = operator.A(x)

    def reconstruct(yy: torch.Tensor) -> torch.Tensor:
        # a nonlinear net that also reads the unmeasured entries (they must stay untouched)
        return torch.tanh(3 * operator.A_adjoint(yy)) + 0.1 * yy

    subject = Subject("model", reconstruct)
    settings = SearchSettings(steps=12, restarts=3, step_size=0.5, check_every=4)
    levels = [0.02, 0.1, 0.3]
    outcomes = worst_case_search(subject, operator, y, x, levels, settings, seeds=[5, 6])
    for outcome, level in zip(outcomes, levels, strict=True):
        e = outcome.perturbation
        assert torch.all(operator.norm(e) <= level * operator.norm(y) * (1 + 1e-6))
        assert torch.count_nonzero(e * (1 - operator.mask)) == 0
        assert torch.all(operator.norm(e) > 0)


def test_zero_filled_reconstruction_attacked_in_image_space() -> None:
    operator = MaskedFourierOperator(random_mask(8, 0.5, seed=1))
    x = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    subject = zero_filled_subject(operator)
    settings = SearchSettings(space="image", steps=10, restarts=2, check_every=5)
    outcomes = worst_case_search(subject, operator, operator.A(x), x, [0.1], settings, [0, 1])
    (outcome,) = outcomes
    r = outcome.image_perturbation
    assert r is not None
    assert torch.all(per_sample_norm(r) <= 0.1 * per_sample_norm(x) * (1 + 1e-6))
    torch.testing.assert_close(outcome.perturbation, operator.A(r))


def _tiny_network(seed: int) -> Subject:
    gen = torch.Generator().manual_seed(seed)
    first, second = torch.randn(32, 16, generator=gen), torch.randn(24, 32, generator=gen)
    return Subject(
        "model", lambda y: (torch.tanh(3 * y @ first.T) @ second.T).view(-1, *IMAGE_SHAPE)
    )


def test_more_restarts_never_do_worse_and_seeds_reproduce() -> None:
    operator, x, _ = _linear_problem(seed=2)
    y = operator.A(x)
    found = {}
    for restarts in (1, 4):
        settings = SearchSettings(steps=8, restarts=restarts, early_stop_tolerance=0.0)
        outcomes = worst_case_search(_tiny_network(7), operator, y, x, [0.2], settings, [1, 2, 3])
        found[restarts] = outcomes[0].objective
    assert torch.all(found[4] >= found[1] - 1e-5 * found[1].abs())
    assert torch.any(found[4] > found[1])  # the extra restarts found something restart 0 did not
    settings = SearchSettings(steps=8, restarts=4, early_stop_tolerance=0.0)
    again = worst_case_search(_tiny_network(7), operator, y, x, [0.2], settings, [1, 2, 3])
    torch.testing.assert_close(again[0].objective, found[4], rtol=0, atol=0)


def test_penalized_linear_model_aligns_with_top_singular_vector() -> None:
    operator, x, recon = _linear_problem(seed=5)
    subject = linear_subject(recon, IMAGE_SHAPE)
    sigma = torch.linalg.svdvals(recon)
    # λ below σ_max² makes the top right singular vector the (unbounded) ascent direction
    penalty = float(sigma[0] ** 2 + sigma[1] ** 2) / 2
    _, _, right = torch.linalg.svd(recon)
    top = right[0]
    for optimizer in ("momentum", "adam"):
        settings = SearchSettings(
            target="reconstruction",
            formulation="penalized",
            penalty=penalty,
            optimizer=optimizer,
            steps=80,
            restarts=1,
            step_size=0.3,
            early_stop_tolerance=0.0,
        )
        (outcome,) = worst_case_search(
            subject, operator, operator.A(x), x, [0.05], settings, [0, 1, 2]
        )
        unit = outcome.perturbation / per_sample_norm(outcome.perturbation).view(-1, 1)
        alignment = (unit @ top).abs()
        assert torch.all(alignment > 0.99), (optimizer, alignment)


def test_passes_are_counted_and_early_stopping_saves_steps() -> None:
    operator, x, recon = _linear_problem(seed=3)
    subject = linear_subject(recon, IMAGE_SHAPE)
    settings = SearchSettings(
        target="reconstruction", steps=200, restarts=2, step_size=0.2, check_every=5
    )
    outcomes = worst_case_search(
        subject, operator, operator.A(x), x, [0.1, 0.2], settings, [0, 1, 2]
    )
    steps = sum(o.steps for o in outcomes)
    assert all(o.steps < 200 for o in outcomes)  # a linear problem converges well before 200
    # the clean reconstruction once per image, then restarts × images per step
    assert subject.counter.forward == 3 + steps * 2 * 3
    assert subject.counter.backward == steps * 2 * 3
