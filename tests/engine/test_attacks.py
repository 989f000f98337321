"""The projected-ascent search against cases whose worst case is known exactly."""

from __future__ import annotations

import pytest
import torch

from tests.engine.worst_case_fixtures import (
    DenseOperator,
    MaskedFourierOperator,
    ReluSwitch,
    counting_subject,
    linear_subject,
    near_isotropic_inverse,
    random_mask,
    zero_filled_subject,
)
from workers.engine.attacks import SearchSettings, ThreatModel, per_sample_norm, worst_case_search
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
    threat = ThreatModel(levels=(0.05, 0.1), target="reconstruction")
    settings = SearchSettings(optimizer="momentum", steps=60, restarts=2, step_size=1.0)
    outcomes = worst_case_search(subject, operator, y, x, threat, settings, seeds=[1, 2, 3])
    sigma_max = torch.linalg.svdvals(recon)[0]
    ratios = []
    for outcome in outcomes:
        e = outcome.perturbation
        ratios.append(per_sample_norm(subject.reconstruct(e)) / per_sample_norm(e))
        assert torch.all(ratios[-1] <= sigma_max * (1 + 1e-5))
    # the scout searches 0.1 first, 0.05 starts from its best and 0.1 again from 0.05's: every
    # image is within 1 % at both
    for ratio in ratios:
        assert torch.all(ratio >= 0.99 * sigma_max), (ratios, sigma_max)


def test_ball_constraint_and_measured_entries_only() -> None:
    operator = MaskedFourierOperator(random_mask(16, 0.3, seed=4))
    x = torch.rand(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    y = operator.A(x)

    def reconstruct(yy: torch.Tensor) -> torch.Tensor:
        # a nonlinear net that also reads the unmeasured entries (they must stay untouched)
        return torch.tanh(3 * operator.A_adjoint(yy)) + 0.1 * yy

    subject = Subject("model", reconstruct)
    settings = SearchSettings(steps=12, restarts=3, step_size=0.5, check_every=4)
    levels = (0.02, 0.1, 0.3)
    outcomes = worst_case_search(
        subject, operator, y, x, ThreatModel(levels), settings, seeds=[5, 6]
    )
    for outcome, level in zip(outcomes, levels, strict=True):
        e = outcome.perturbation
        assert torch.all(operator.norm(e) <= level * operator.norm(y) * (1 + 1e-6))
        assert torch.count_nonzero(e * (1 - operator.mask)) == 0
        assert torch.all(operator.norm(e) > 0)


def test_zero_filled_reconstruction_attacked_in_image_space() -> None:
    operator = MaskedFourierOperator(random_mask(8, 0.5, seed=1))
    x = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    subject = zero_filled_subject(operator)
    threat = ThreatModel(levels=(0.1,), space="image")
    settings = SearchSettings(steps=10, restarts=2, check_every=5)
    outcomes = worst_case_search(subject, operator, operator.A(x), x, threat, settings, [0, 1])
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
        outcomes = worst_case_search(
            _tiny_network(7), operator, y, x, ThreatModel((0.2,)), settings, [1, 2, 3]
        )
        found[restarts] = outcomes[0].objective
    assert torch.all(found[4] >= found[1] - 1e-5 * found[1].abs())
    assert torch.any(found[4] > found[1])  # the extra restarts found something restart 0 did not
    settings = SearchSettings(steps=8, restarts=4, early_stop_tolerance=0.0)
    again = worst_case_search(
        _tiny_network(7), operator, y, x, ThreatModel((0.2,)), settings, [1, 2, 3]
    )
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
        threat = ThreatModel(
            levels=(0.05,), target="reconstruction", formulation="penalized", penalty=penalty
        )
        settings = SearchSettings(
            optimizer=optimizer, steps=80, restarts=1, step_size=0.3, early_stop_tolerance=0.0
        )
        (outcome,) = worst_case_search(
            subject, operator, operator.A(x), x, threat, settings, [0, 1, 2]
        )
        unit = outcome.perturbation / per_sample_norm(outcome.perturbation).view(-1, 1)
        alignment = (unit @ top).abs()
        assert torch.all(alignment > 0.99), (optimizer, alignment)


def test_passes_are_counted_and_early_stopping_saves_steps() -> None:
    operator, x, recon = _linear_problem(seed=3)
    subject = linear_subject(recon, IMAGE_SHAPE)
    threat = ThreatModel(levels=(0.1, 0.2), target="reconstruction")
    settings = SearchSettings(steps=200, restarts=2, step_size=0.2, check_every=5)
    outcomes = worst_case_search(subject, operator, operator.A(x), x, threat, settings, [0, 1, 2])
    # the largest level's steps include the scout's (it searched that level first)
    steps = sum(o.steps for o in outcomes)
    # a linear problem settles well before 200 steps, but no level stops before half of them
    assert 100 <= outcomes[0].steps < 200 and 200 <= outcomes[1].steps < 400
    # the clean reconstruction once per image, then restarts × images per step
    assert subject.counter.forward == 3 + steps * 2 * 3
    assert subject.counter.backward == steps * 2 * 3


def _inverse_problem(
    smallest: float, rotated: bool, value_range: tuple[float, float], seed: int = 0
) -> tuple[DenseOperator, Subject, torch.Tensor]:
    """Square A = U diag(s) Vᵀ with singular values from 1 down to `smallest`, Ψ = A⁻¹: the
    worst ‖Ψ(y + e) − x‖ over ‖e‖ ≤ ρ is exactly ρ / σ_min, along A's last left singular
    vector. Diagonal A (U a permutation, V = I) is where Adam's sign-like steps go wrong."""
    gen = torch.Generator().manual_seed(seed)
    n = 24
    singular = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), n, dtype=torch.float64)
    if rotated:
        left, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        right, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    else:
        left = torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
        right = torch.eye(n, dtype=torch.float64)
    forward = left @ torch.diag(singular) @ right.T
    inverse = right @ torch.diag(1 / singular) @ left.T
    operator = DenseOperator(forward.float(), IMAGE_SHAPE)
    low, high = value_range
    x = low + (high - low) * torch.rand(3, *IMAGE_SHAPE, generator=gen)
    return operator, linear_subject(inverse.float(), IMAGE_SHAPE), x


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-300.0, 300.0)])
@pytest.mark.parametrize("rotated", [False, True], ids=["diagonal", "rotated"])
@pytest.mark.parametrize("smallest", [1.0, 0.2, 0.05, 0.01])
def test_default_search_is_exact_on_the_inverse_of_any_linear_operator(
    smallest: float, rotated: bool, value_range: tuple[float, float]
) -> None:
    operator, subject, x = _inverse_problem(smallest, rotated, value_range)
    y = operator.A(x)
    levels = (0.01, 0.05)
    outcomes = worst_case_search(
        subject, operator, y, x, ThreatModel(levels), SearchSettings(), [1, 2, 3]
    )
    assert tuple(o.level for o in outcomes) == levels
    for outcome in outcomes:
        e = outcome.perturbation
        attacked = subject.reconstruct(y + e)
        ratio = per_sample_norm(attacked - subject.reconstruct(y)) / per_sample_norm(e)
        exact_error = outcome.level * per_sample_norm(y) / smallest
        error = per_sample_norm(attacked - x)
        assert torch.all(ratio * smallest >= 0.99), (outcome.level, ratio * smallest)
        assert torch.all(ratio * smallest <= 1 + 1e-3)
        assert torch.all(error >= 0.99 * exact_error), (outcome.level, error / exact_error)
        assert outcome.found_by == ["pgd"] * 3


def test_adam_stays_short_of_the_maximiser_where_the_default_reaches_it() -> None:
    """Why pgd is the default: on a diagonal A, Adam's per-entry scaling has fixed points on
    the sphere that are not the maximiser."""
    operator, subject, x = _inverse_problem(0.05, rotated=False, value_range=(0.0, 1.0))
    y = operator.A(x)
    found = {}
    for optimizer in ("adam", "pgd"):
        settings = SearchSettings(optimizer=optimizer)
        (outcome,) = worst_case_search(
            subject, operator, y, x, ThreatModel((0.05,)), settings, [1, 2, 3]
        )
        e = outcome.perturbation
        found[optimizer] = per_sample_norm(subject.reconstruct(e) - subject.reconstruct(0 * e))
        found[optimizer] = found[optimizer] / per_sample_norm(e) * 0.05
    assert torch.all(found["pgd"] >= 0.99)
    assert torch.all(found["adam"] < 0.9)


def test_default_search_is_exact_in_image_space() -> None:
    """Ψ(y) = B y, r in image space, target Ψ(y): max ‖B A r‖ over ‖r‖ ≤ δ‖x‖ is σ_max(BA)·δ‖x‖."""
    operator, x, recon = _linear_problem(seed=4)
    subject = linear_subject(recon, IMAGE_SHAPE)
    threat = ThreatModel(levels=(0.05, 0.1), space="image", target="reconstruction")
    outcomes = worst_case_search(
        subject, operator, operator.A(x), x, threat, SearchSettings(), [0, 1, 2]
    )
    sigma = torch.linalg.svdvals(recon @ operator.matrix)[0]
    for outcome in outcomes:
        r = outcome.image_perturbation
        assert r is not None
        gain = per_sample_norm(subject.reconstruct(operator.A(r))) / per_sample_norm(r)
        assert torch.all(gain >= 0.99 * sigma) and torch.all(gain <= sigma * (1 + 1e-4))
        assert torch.all(per_sample_norm(r) <= outcome.level * per_sample_norm(x) * (1 + 1e-6))


@pytest.mark.parametrize("margin", [1.05, 1.5, 4.0])
def test_default_search_reaches_the_exact_penalised_maximiser(margin: float) -> None:
    """½‖B(y + e) − x‖² − λ/2‖e‖² with λ > σ_max(B)² is a concave quadratic: its maximiser is
    e* = (λI − BᵀB)⁻¹ Bᵀ c with c = B y − x (noisy y, so c ≠ 0)."""
    gen = torch.Generator().manual_seed(8)
    operator, x, recon = _linear_problem(seed=6)
    recon = recon * 0.3
    subject = linear_subject(recon, IMAGE_SHAPE)
    y = operator.A(x) + 0.3 * torch.randn(3, 16, generator=gen)
    penalty = float(torch.linalg.svdvals(recon)[0] ** 2) * margin

    def objective(e: torch.Tensor) -> torch.Tensor:
        misfit = per_sample_norm((y + e) @ recon.T - x.flatten(1)) ** 2
        return 0.5 * misfit - 0.5 * penalty * per_sample_norm(e) ** 2

    residual = (y @ recon.T - x.flatten(1)).double()
    system = penalty * torch.eye(16, dtype=torch.float64) - (recon.T @ recon).double()
    best = torch.linalg.solve(system, (residual @ recon.double()).T).T.float()
    threat = ThreatModel(levels=(0.05,), formulation="penalized", penalty=penalty)
    (outcome,) = worst_case_search(subject, operator, y, x, threat, SearchSettings(), [0, 1, 2])
    reached = objective(outcome.perturbation) / objective(best)
    assert torch.all(reached >= 0.99) and torch.all(reached <= 1 + 1e-5), reached


def test_levels_run_smallest_first_and_a_stopped_search_keeps_the_finished_ones() -> None:
    operator, subject, x = _inverse_problem(0.2, rotated=True, value_range=(0.0, 1.0))
    y = operator.A(x)
    threat = ThreatModel(levels=(0.01, 0.1, 0.05))
    settings = SearchSettings(steps=20, check_every=5)
    everything = worst_case_search(subject, operator, y, x, threat, settings, [4, 5, 6])
    assert tuple(o.level for o in everything) == threat.levels  # the caller's order
    # a stop requested during the scout (the largest level, first) keeps nothing
    stopped = worst_case_search(subject, operator, y, x, threat, settings, [4, 5, 6], lambda: True)
    assert stopped == []
    # without early stopping, 4 checks per level of 20 steps and one after each level: the
    # scout's 5, then a stop at the smallest level's first check
    requests = iter([False] * 5 + [True])
    fixed = SearchSettings(steps=20, check_every=5, early_stop_tolerance=0.0)
    stopped = worst_case_search(
        subject, operator, y, x, threat, fixed, [4, 5, 6], lambda: next(requests, True)
    )
    assert [o.level for o in stopped] == [0.01]
    assert stopped[0].steps == 5  # its first check


def test_ensemble_splits_restarts_and_names_the_winner() -> None:
    operator, x, _ = _linear_problem(seed=2)
    y = operator.A(x)
    settings = SearchSettings(optimizer="ensemble", restarts=4, steps=20)
    assert settings.restart_optimizers() == ["pgd", "pgd", "adam", "adam"]
    threat = ThreatModel(levels=(0.2,))
    (outcome,) = worst_case_search(_tiny_network(7), operator, y, x, threat, settings, [1, 2, 3])
    assert set(outcome.found_by) <= {"pgd", "adam"} and len(outcome.found_by) == 3
    # the winner's objective is the best of all restarts of both optimisers
    for optimizer in ("pgd", "adam"):
        alone = SearchSettings(optimizer=optimizer, restarts=2, steps=20)
        (single,) = worst_case_search(_tiny_network(7), operator, y, x, threat, alone, [1, 2, 3])
        if optimizer == "pgd":  # the ensemble's pgd restarts are these very restarts
            assert torch.all(outcome.objective >= single.objective - 1e-5 * single.objective.abs())


def test_pgd_checkpoints_follow_apgd() -> None:
    from workers.engine.attacks import pgd_checkpoints

    windows = pgd_checkpoints(100)
    assert list(windows) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert sum(windows.values()) == 99


def test_antithetic_starts_find_the_one_sided_worst_case() -> None:
    """Ψ(y) = y + (k − 1)·max(⟨u, y − y₀⟩, 0)·u is the identity except on one side of y₀ along
    u: the worst ‖Ψ(y₀ + e) − Ψ(y₀)‖ over ‖e‖ ≤ ρ is exactly kρ at e = +ρu, while every start
    with ⟨u, e⟩ < 0 sits where the gradient is radial (a fixed point at ratio 1). Starts come in
    pairs ±d, so every image reaches k with 2 restarts, whatever its seed."""
    gen = torch.Generator().manual_seed(0)
    n, images, gain = 24, 8, 5.0
    operator = DenseOperator(torch.eye(n), IMAGE_SHAPE)
    x = torch.rand(images, *IMAGE_SHAPE, generator=gen)
    y = operator.A(x)
    u = torch.randn(n, generator=gen)
    u = u / u.norm()

    def one_sided(yy: torch.Tensor) -> torch.Tensor:
        # y₀ of each sample: the batch is restarts × images, in that order
        along = ((yy - y.repeat(yy.shape[0] // images, 1)) @ u).clamp_min(0)
        return (yy + (gain - 1) * along[:, None] * u).view(-1, *IMAGE_SHAPE)

    subject = Subject("model", one_sided)
    level = 0.1
    threat = ThreatModel(levels=(level,), target="reconstruction")
    settings = SearchSettings(restarts=2)
    (outcome,) = worst_case_search(subject, operator, y, x, threat, settings, list(range(images)))
    with torch.no_grad():
        e = outcome.perturbation
        ratio = per_sample_norm(one_sided(y + e) - one_sided(y)) / per_sample_norm(e)
    assert torch.all(ratio >= 0.99 * gain), ratio
    assert torch.all(per_sample_norm(e) <= level * per_sample_norm(y) * (1 + 1e-6))


# ------------------------------------------------------ the stopping rule, monotone levels

DEFAULT_LEVELS = (0.01, 0.02, 0.05)  # WorstCaseCheck's


@pytest.mark.parametrize(
    ("size", "gain", "threshold", "seed", "rotated"),
    [
        (16, 1.02, 0.5, 0, True),  # issue 19: the old rule stopped at step 20, ratio 1.0001 of 3.09
        (16, 1.02, 0.3, 1, False),  # the ReLU reachable at 0.02 too
        (12, 1.02, 0.8, 2, True),  # barely reachable at 0.05
        (8, 1.05, 0.3, 3, True),
        (12, 1.1, 0.6, 4, False),
        (8, 1.01, 0.5, 5, True),
    ],
)
def test_default_search_finds_a_relu_that_switches_on_inside_the_ball(
    size: int, gain: float, threshold: float, seed: int, rotated: bool
) -> None:
    """Ψ(y) = B y + c·relu(⟨v, y⟩ − t)·u, B of gain g along v and 1 (isotropic) elsewhere: the
    exact worst ‖Ψ(y+e) − Ψ(y)‖ over ‖e‖ ≤ ρ is max(gρ, (g + c)ρ − c·a), a = t − ⟨v, y⟩
    (ReluSwitch's docstring), at e = ±ρv; the Lipschitz ratio there is that over ρ."""
    problem = ReluSwitch(size, gain, 4.0, threshold, images=3, seed=seed, rotated=rotated)
    outcomes = worst_case_search(
        problem.subject,
        problem.operator,
        problem.y,
        problem.x,
        ThreatModel(DEFAULT_LEVELS),
        SearchSettings(),
        [seed, seed + 1, seed + 2],
    )
    y_norm = per_sample_norm(problem.y.double())
    switched = 0
    for outcome in outcomes:
        e = outcome.perturbation.double()
        radius = outcome.level * y_norm
        assert torch.all(per_sample_norm(e) <= radius * (1 + 1e-5))
        exact = problem.exact_change(outcome.level)
        change = problem.change(e)
        ratio, exact_ratio = change / per_sample_norm(e), exact / radius
        assert torch.all(change >= 0.99 * exact), (outcome.level, change / exact)
        assert torch.all(change <= exact * (1 + 1e-4)), (outcome.level, change / exact)
        assert torch.all(ratio >= 0.99 * exact_ratio), (outcome.level, ratio, exact_ratio)
        switched += int((exact > gain * radius * 1.01).sum())
    assert switched > 0  # the ReLU is within reach somewhere: the case tests what it claims


@pytest.mark.parametrize("rotated", [False, True], ids=["diagonal", "rotated"])
@pytest.mark.parametrize(
    ("gap", "size", "seed", "floor"),
    [(0.02, 16, 0, None), (0.02, 8, 1, None), (0.01, 12, 2, None), (0.02, 16, 3, 0.5)],
)
def test_default_search_holds_near_isotropic_linear_models_to_one_percent(
    gap: float, size: int, seed: int, floor: float | None, rotated: bool
) -> None:
    """Ψ = B = A⁻¹ with σ₁(B) = 1 and every other singular value 1 − gap (or from 1 − gap down
    to `floor`): the worst ‖Ψ(y+e) − x‖ over ‖e‖ ≤ δ‖y‖ is δ‖y‖, the Lipschitz ratio 1. The
    old rule stopped these at about 1 − gap."""
    gen = torch.Generator().manual_seed(seed)
    n = size * size
    a, b, _ = near_isotropic_inverse(n, gap, rotated, gen, floor)
    shape = (1, size, size)
    operator = DenseOperator(a.float(), shape)
    subject = linear_subject(b.float(), shape)
    x = torch.rand(3, *shape, generator=gen)
    y = operator.A(x)
    outcomes = worst_case_search(
        subject, operator, y, x, ThreatModel(DEFAULT_LEVELS), SearchSettings(), [1, 2, 3]
    )
    for outcome in outcomes:
        e = outcome.perturbation.double()
        ratio = per_sample_norm(e @ b.T) / per_sample_norm(e)
        assert torch.all(ratio >= 0.99) and torch.all(ratio <= 1 + 1e-5), (outcome.level, ratio)
        error = per_sample_norm(subject.reconstruct(y + outcome.perturbation).double() - x)
        exact = outcome.level * per_sample_norm(y.double())
        assert torch.all(error >= 0.99 * exact), (outcome.level, error / exact)


def test_no_level_stops_before_half_its_steps() -> None:
    """A well-conditioned linear model settles within a few steps: the rule still runs half."""
    operator, subject, x = _inverse_problem(1.0, rotated=True, value_range=(0.0, 1.0))
    for steps in (20, 41, 100):
        settings = SearchSettings(steps=steps, check_every=max(1, min(10, steps // 5)))
        outcomes = worst_case_search(
            subject, operator, operator.A(x), x, ThreatModel((0.01, 0.05)), settings, [1, 2, 3]
        )
        smallest, largest = outcomes
        assert settings.min_steps() == -(-steps // 2)
        assert settings.min_steps() <= smallest.steps < steps  # settled, then stopped
        assert 2 * settings.min_steps() <= largest.steps < 2 * steps  # the scout's and its own


def _shell(y0: torch.Tensor, level: float, width: float, height: float) -> Subject:
    """Ψ(y) = y + h·k(‖y − y₀‖)·(y − y₀), k(r) = exp(−((r − p)/(w·p))²) with p = level·‖y₀‖ per
    image: ‖Ψ(y₀+e) − Ψ(y₀)‖ = r(1 + h·k(r)), r = ‖e‖, p(1 + h) on the sphere of radius p (the
    ball of `level`) and about r on spheres well outside it."""
    images = y0.shape[0]

    def reconstruct(y: torch.Tensor) -> torch.Tensor:
        rows = y.shape[0] // images
        offset = y - y0.repeat(rows, 1)
        peak = level * y0.norm(dim=1, keepdim=True).repeat(rows, 1)
        r = offset.norm(dim=1, keepdim=True)
        bump = height * torch.exp(-(((r - peak) / (width * peak)) ** 2))
        return (y + offset * bump).view(-1, *IMAGE_SHAPE)

    return counting_subject(reconstruct)


def test_a_larger_level_reports_the_smaller_ones_worst_when_its_search_ends_lower() -> None:
    """The error peaks on the sphere of the 0.05 ball (radius p): p(1 + h) = 6p there, about
    3p on the 0.15 sphere (k(3p) = e^(−44)). The 0.15 level's ascent goes out to its sphere
    (the error grows outward at p), so its own search ends lower; it must report the 0.05
    level's perturbation, evaluated at 0.15 (the same value), and say so (carried)."""
    gen = torch.Generator().manual_seed(0)
    operator = DenseOperator(torch.eye(24), IMAGE_SHAPE)
    x = torch.rand(3, *IMAGE_SHAPE, generator=gen) + 0.5
    y = operator.A(x)
    subject = _shell(y, 0.05, width=0.3, height=5.0)
    threat = ThreatModel(levels=(0.05, 0.15), target="reconstruction")
    small, large = worst_case_search(subject, operator, y, x, threat, SearchSettings(), [1, 2, 3])

    def change(e: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return per_sample_norm(subject.reconstruct(y + e) - subject.reconstruct(y))

    peak = 0.05 * per_sample_norm(y)
    torch.testing.assert_close(change(small.perturbation), 6 * peak, rtol=1e-4, atol=0)
    assert torch.all(change(large.perturbation) >= change(small.perturbation) * (1 - 1e-6))
    assert large.carried == [True, True, True] and small.carried == [False] * 3
    torch.testing.assert_close(large.perturbation, small.perturbation, rtol=0, atol=0)
    # the objective was evaluated at the larger level, and it is the same number
    torch.testing.assert_close(large.objective, change(large.perturbation) ** 2, rtol=1e-5, atol=0)


@pytest.mark.parametrize("space", ["measurement", "image"])
@pytest.mark.parametrize("target", ["ground_truth", "reconstruction"])
def test_the_worst_objective_never_falls_from_one_level_to_the_next(
    space: str, target: str
) -> None:
    """A nonlinear network, five levels, a small budget: whatever each level's search does, a
    larger ball contains the smaller ones, so the worst error found must not fall."""
    operator, x, _ = _linear_problem(seed=2)
    y = operator.A(x)
    levels = (0.02, 0.05, 0.1, 0.2, 0.4)
    threat = ThreatModel(levels=levels, space=space, target=target)  # type: ignore[arg-type]
    for steps, restarts in ((4, 1), (12, 2), (30, 4)):
        settings = SearchSettings(steps=steps, restarts=restarts)
        outcomes = worst_case_search(_tiny_network(7), operator, y, x, threat, settings, [1, 2, 3])
        errors = []
        for outcome in outcomes:
            with torch.no_grad():
                attacked = _tiny_network(7).reconstruct(y + outcome.perturbation)
                reference = x if target == "ground_truth" else _tiny_network(7).reconstruct(y)
            errors.append(per_sample_norm(attacked - reference) ** 2)
            torch.testing.assert_close(outcome.objective, errors[-1], rtol=1e-4, atol=1e-7)
        for smaller, larger in zip(errors, errors[1:], strict=False):
            assert torch.all(larger >= smaller * (1 - 1e-5)), (steps, restarts, smaller, larger)


def test_penalised_levels_pose_one_problem_and_never_lose_ground() -> None:
    """Penalised, δ only scales the start and the reach: every level maximises the same
    objective, and each starts from the previous level's best as it is, so its objective never
    falls (the levels' values rise to the one maximiser)."""
    operator, x, recon = _linear_problem(seed=6)
    recon = recon * 0.3
    subject = linear_subject(recon, IMAGE_SHAPE)
    y = operator.A(x) + 0.3 * torch.randn(3, 16, generator=torch.Generator().manual_seed(8))
    penalty = float(torch.linalg.svdvals(recon)[0] ** 2) * 1.5
    threat = ThreatModel(levels=(0.01, 0.05, 0.2), formulation="penalized", penalty=penalty)
    for steps in (3, 10, 100):
        outcomes = worst_case_search(
            subject, operator, y, x, threat, SearchSettings(steps=steps), [0, 1, 2]
        )
        for smaller, larger in zip(outcomes, outcomes[1:], strict=False):
            assert torch.all(larger.objective >= smaller.objective - 1e-6 * smaller.objective.abs())
