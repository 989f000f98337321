"""Worst-case perturbation search: projected gradient ascent on the reconstruction error.

For a sweep of relative levels δ it looks for a perturbation that maximises

- `ball`:      ‖Ψ(y + e) − t‖²                 subject to ‖e‖ ≤ δ‖y‖   (measurement space), or
               ‖Ψ(y + A r) − t‖²               subject to ‖r‖ ≤ δ‖x‖   (image space, e = A r);
- `penalized`: ½‖Ψ(y + e) − t‖² − λ/2‖v‖²      with v = e or r, no ball (δ only sets the scale of
               the initialisation and of the steps),

where t is the ground truth x or the clean reconstruction Ψ(y). Measurement-space perturbations
are kept on the measured entries (operator.project) and measured with operator.norm.

Optimisers (docs/reports.md, "worst_case"):

- `pgd` (default): ℓ2 projected gradient ascent in the manner of APGD (Croce & Hein, 2020):
  steps along the ℓ2-normalised gradient, first of the ball's diameter (so the first steps land
  on the boundary: on a linear Ψ this is a power iteration and reaches the top singular
  direction), with momentum 0.75, and the step halved per sample at checkpoints where the
  ascent oscillates or stalls, restarting from the best point. Its fixed points on the sphere
  are the maximisers' (the gradient is parallel to the point), which Adam's are not.
- `adam`, `momentum`: a fixed step length along Adam's or a heavy-ball direction.
- `ensemble`: half the restarts `pgd`, half `adam`; the larger error per image wins.

The attack takes its threat model (`ThreatModel`: levels, space, target, formulation and λ,
what a perfect optimiser's answer depends on) and its search settings (`SearchSettings`:
optimiser, steps, restarts, step size, early stopping) as two arguments, as the API's
WorstCaseCheck is composed of WorstCaseThreatModel and WorstCaseSearch.

Levels are searched from the SMALLEST up, and every perturbation feasible at a level is
feasible at the next (its ball contains the smaller one): restart 0 of the next level starts
at the level's worst perturbation as it is, its other warm restarts at the next best ones
scaled to the new radius, the rest afresh on the sphere. The first step evaluates the start, so
the worst objective found never falls from one level to the next (`LevelOutcome.carried` says
where the search found nothing above the carried perturbation). In the penalised formulation δ
only sets the scale of the start and of the reach: every level poses the same problem, and the
carried start makes each level's objective at least the previous level's.

Stopping (`SearchSettings.early_stop_tolerance`): a level never stops before
MIN_STEPS_FRACTION of its steps; after that it stops at a check (every `check_every` steps) once
every restart has settled: its iterate and its best point each moved less than
`early_stop_tolerance` × the radius (or × ‖v‖ where that is larger: the penalised search) since
the previous check. A small objective gain is not a stop: a slow climb (a power iteration on
near-equal singular values, a ReLU not yet switched on) gains little per check while its
iterate still moves.

Speed: restarts and images share ONE forward/backward per step (batch index = restart * B +
image). The loop never syncs with the device except at the checks, every `check_every` steps,
which are also the only places the stopping rule costs anything (two norms per restart).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from schemas.checks import WorstCaseSearch, WorstCaseThreatModel
from workers.engine.context import Operator, Subject

# the step's default per optimiser, relative to the radius: pgd's is the initial step (then
# halved adaptively), the others' is fixed
DEFAULT_STEP_SIZE = {"pgd": 2.0, "adam": 0.1, "momentum": 0.1}
_ADAM_BETAS = (0.9, 0.999)
_MOMENTUM = 0.5  # larger values lag on the sphere: the buffer keeps stale radial parts
_PGD_MOMENTUM = 0.75  # APGD's α
_PGD_SUCCESS_FRACTION = 0.75  # APGD's ρ: fewer rising steps than this in a window halve the step
# the penalised search stays within this many radii: reaching it means the objective is unbounded
# above (λ below the squared local gain), and keeps the numbers finite
PENALIZED_REACH = 1e4
_TINY = 1e-12
# a level runs at least this fraction of its steps before the stopping rule may end it
MIN_STEPS_FRACTION = 0.5


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker may do and what it degrades: relative levels δ (any order, each
    searched), the space of the perturbation, the target of the error, and the formulation
    (the ball ‖v‖ ≤ δ·scale, or the penalty λ/2‖v‖² without a ball). `from_check` reads them
    from the API's WorstCaseThreatModel (or a WorstCaseCheck, which is one)."""

    levels: tuple[float, ...]
    space: Literal["measurement", "image"] = "measurement"
    target: Literal["ground_truth", "reconstruction"] = "ground_truth"
    formulation: Literal["ball", "penalized"] = "ball"
    penalty: float = 1.0  # λ of the penalised formulation

    @classmethod
    def from_check(cls, config: WorstCaseThreatModel) -> ThreatModel:
        return cls(
            levels=tuple(config.levels),
            space=config.space,
            target=config.target,
            formulation=config.formulation,
            penalty=config.lambda_,
        )

    @property
    def penalized(self) -> bool:
        return self.formulation == "penalized"


@dataclass(frozen=True)
class SearchSettings:
    """The search's hyper-parameters, which decide how close it gets to the threat model's worst
    case; `from_check` reads them from the API's WorstCaseSearch (or a WorstCaseCheck)."""

    optimizer: Literal["pgd", "adam", "momentum", "ensemble"] = "pgd"
    steps: int = 100
    restarts: int = 4
    step_size: float | None = None  # relative to the radius δ‖y‖ (or δ‖x‖); None: per optimiser
    # a restart has settled when its iterate and its best point moved less than this × the
    # radius over a check interval; a level stops (after MIN_STEPS_FRACTION of its steps) when
    # every restart has settled. 0 disables early stopping
    early_stop_tolerance: float = 1e-3
    check_every: int = 10  # steps between early-stopping checks (the only device syncs)

    def min_steps(self) -> int:
        """The steps a level runs before it may stop early."""
        return max(1, math.ceil(MIN_STEPS_FRACTION * self.steps))

    @classmethod
    def from_check(cls, config: WorstCaseSearch) -> SearchSettings:
        return cls(
            optimizer=config.optimizer,
            steps=config.steps,
            restarts=config.restarts,
            step_size=config.step_size,
            early_stop_tolerance=config.early_stop_tolerance,
            check_every=max(1, min(10, config.steps // 5)),
        )

    def restart_optimizers(self) -> list[str]:
        """The optimiser of each restart; an ensemble gives the first half (the warm-started
        restarts among them) to pgd and the rest to adam."""
        if self.optimizer != "ensemble":
            return [self.optimizer] * self.restarts
        pgd = max(1, math.ceil(self.restarts / 2))
        return ["pgd"] * pgd + ["adam"] * (self.restarts - pgd)

    def step_for(self, optimizer: str) -> float:
        return DEFAULT_STEP_SIZE[optimizer] if self.step_size is None else self.step_size


@dataclass
class LevelOutcome:
    """The worst restart per image at one level (all tensors detached, batch first)."""

    level: float
    perturbation: torch.Tensor  # e in measurement space, [B, *measurement_shape]
    image_perturbation: torch.Tensor | None  # r when the search ran in image space
    objective: torch.Tensor  # [B], the search objective at the returned perturbation
    steps: int  # steps run before the level stopped
    found_by: list[str] = field(default_factory=list)  # per image: the optimiser of the winner
    # per image: the worst perturbation is the smaller level's, as it is (this level's search
    # found nothing above it); its objective was evaluated at this level, not copied
    carried: list[bool] = field(default_factory=list)


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm of each sample of a batch: shape [B]."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape [B] values to broadcast against a batch shaped like `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class _SearchSpace:
    """Where the search variable v lives and how it becomes a measurement perturbation e."""

    def __init__(self, operator: Operator, space: str) -> None:
        self.operator = operator
        self.in_image = space == "image"

    def to_measurement(self, v: torch.Tensor) -> torch.Tensor:
        return self.operator.A(v) if self.in_image else v

    def keep_in_range(self, v: torch.Tensor) -> torch.Tensor:
        # image-space perturbations are unconstrained besides their norm
        return v if self.in_image else self.operator.project(v)

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        return per_sample_norm(v) if self.in_image else self.operator.norm(v)

    def normalised(self, v: torch.Tensor) -> torch.Tensor:
        return v / _per_sample(self.norm(v).clamp_min(_TINY), v)

    def into_ball(self, v: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        v = self.keep_in_range(v)
        shrink = (radius / self.norm(v).clamp_min(_TINY)).clamp(max=1.0)
        return v * _per_sample(shrink, v)


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / _per_sample(per_sample_norm(t).clamp_min(_TINY), t)


def _constrain(
    v: torch.Tensor, radius: torch.Tensor, mask: torch.Tensor | None, penalized: bool
) -> torch.Tensor:
    """Onto the measured entries, and into the ball (of PENALIZED_REACH radii when the
    formulation is penalised)."""
    if mask is not None:
        v = v * mask
    limit = radius * PENALIZED_REACH if penalized else radius
    return v * _per_sample((limit / per_sample_norm(v).clamp_min(_TINY)).clamp(max=1.0), v)


def _keep_best(
    v: torch.Tensor,
    objective: torch.Tensor,
    best_objective: torch.Tensor,
    best_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    improved = objective > best_objective
    best_objective = torch.where(improved, objective, best_objective)
    best_v = torch.where(_per_sample(improved, v), v, best_v)
    return improved, best_objective, best_v


def _fixed_step_update(
    v: torch.Tensor,
    grad: torch.Tensor,
    objective: torch.Tensor,
    best_objective: torch.Tensor,
    best_v: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    step_length: torch.Tensor,
    radius: torch.Tensor,
    mask: torch.Tensor | None,
    corrections: torch.Tensor,
    optimizer: str,
    penalized: bool,
) -> tuple[torch.Tensor, ...]:
    """One `adam` or `momentum` step: keep the best point, move along a normalised Adam or
    heavy-ball direction by a fixed length (step_size × radius), project back onto the ball.

    Pure functions of tensors (this one and `_pgd_update`), so that on a GPU each compiles
    into a few fused kernels instead of ~20 launches that would cost as much as the network's
    pass at small batches. `mask` (1 on measured entries) is None in image space;
    `corrections` holds Adam's bias corrections as a tensor so that the compiled function is
    not specialised per step.
    """
    _, best_objective, best_v = _keep_best(v, objective, best_objective, best_v)
    if mask is not None:
        grad = grad * mask
    if optimizer == "momentum":
        first = _MOMENTUM * first + _unit(grad)
        direction = _unit(first)
    else:
        beta1, beta2 = _ADAM_BETAS
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        # masked entries have zero moments, so the direction stays on the measured entries
        direction = _unit((first / corrections[0]) / ((second / corrections[1]).sqrt() + _TINY))
    v = _constrain(v + step_length * direction, radius, mask, penalized)
    return v, best_objective, best_v, first, second


def _pgd_update(
    v: torch.Tensor,
    grad: torch.Tensor,
    objective: torch.Tensor,
    best_objective: torch.Tensor,
    best_v: torch.Tensor,
    v_previous: torch.Tensor,
    objective_previous: torch.Tensor,
    best_grad: torch.Tensor,
    step_length: torch.Tensor,
    successes: torch.Tensor,
    checkpoint_best: torch.Tensor,
    reduced_last: torch.Tensor,
    radius: torch.Tensor,
    mask: torch.Tensor | None,
    window: torch.Tensor,
    first_step: torch.Tensor,
    penalized: bool,
) -> tuple[torch.Tensor, ...]:
    """One `pgd` step (APGD's update with ℓ2-normalised gradients, for a maximisation).

    `window` > 0 marks a checkpoint: where fewer than ρ·window of the steps since the last
    checkpoint raised the objective, or the best did not move and the step was not halved last
    time, the step is halved and the sample restarts from its best point and gradient.
    `window` and `first_step` are 0-d tensors and the checkpoint logic has no branch, so that
    the compiled function is the same graph at every step.
    """
    improved, best_objective, best_v = _keep_best(v, objective, best_objective, best_v)
    best_grad = torch.where(_per_sample(improved, grad), grad, best_grad)
    successes = successes + (objective > objective_previous).to(successes.dtype)
    objective_previous = objective
    checkpoint = window > 0
    oscillating = successes < _PGD_SUCCESS_FRACTION * window
    stalled = ~reduced_last & (best_objective <= checkpoint_best)
    reduce = (oscillating | stalled) & checkpoint
    step_length = torch.where(_per_sample(reduce, step_length), step_length / 2, step_length)
    at_best = _per_sample(reduce, v)
    v = torch.where(at_best, best_v, v)
    grad = torch.where(at_best, best_grad, grad)
    v_previous = torch.where(at_best, best_v, v_previous)
    objective_previous = torch.where(reduce, best_objective, objective_previous)
    reduced_last = torch.where(checkpoint, reduce, reduced_last)
    checkpoint_best = torch.where(checkpoint, best_objective, checkpoint_best)
    successes = torch.where(checkpoint, torch.zeros_like(successes), successes)
    if mask is not None:
        grad = grad * mask
    # penalised: the raw gradient, step_length already holds 1/λ (see _Group); the ball: the
    # ℓ2-normalised gradient, step_length a fraction of the radius
    direction = grad if penalized else _unit(grad)
    z = _constrain(v + step_length * direction, radius, mask, penalized)
    moved = v + _PGD_MOMENTUM * (z - v) + (1 - _PGD_MOMENTUM) * (v - v_previous)
    moved = torch.where(first_step, z, _constrain(moved, radius, mask, penalized))
    return (
        moved,
        best_objective,
        best_v,
        v,
        objective_previous,
        best_grad,
        step_length,
        successes,
        checkpoint_best,
        reduced_last,
    )


def pgd_checkpoints(steps: int) -> dict[int, int]:
    """APGD's checkpoints for a budget of `steps`: step index → steps since the previous one
    (p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06))."""
    fractions = [0.0, 0.22]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    # rounded first: 0.22 + 0.19 + 0.16 must give 57 steps of 100, not 58
    marks = sorted({math.ceil(round(p * steps, 6)) for p in fractions[1:]} - {steps})
    marks = [mark for mark in marks if mark < steps]
    windows: dict[int, int] = {}
    previous = 0
    for mark in marks:
        if mark > previous:
            windows[mark] = mark - previous
            previous = mark
    return windows


class _Compiled:
    """A pure update function, compiled with torch.compile on CUDA (eager elsewhere, and as a
    fallback wherever compilation is unavailable)."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], device: torch.device) -> None:
        self._eager = fn
        self._fn = fn
        self._compiled = device.type == "cuda"
        if self._compiled:
            self._fn = torch.compile(fn, dynamic=False)

    def __call__(self, *args: object) -> tuple[torch.Tensor, ...]:
        try:
            return self._fn(*args)
        except Exception:  # no triton / compiler: the eager function gives the same result
            if not self._compiled:
                raise
            self._fn, self._compiled = self._eager, False
            return self._fn(*args)


class _Group:
    """The restarts of one optimiser: a contiguous slice of the batch and its state."""

    def __init__(
        self,
        optimizer: str,
        rows: slice,
        v: torch.Tensor,
        threat: ThreatModel,
        settings: SearchSettings,
        radius: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> None:
        self.optimizer = optimizer
        self.rows = rows
        self.penalized = threat.penalized
        self.radius = radius
        self.mask = mask
        self.step_length = _per_sample(settings.step_for(optimizer) * radius, v)
        if optimizer == "pgd" and self.penalized:
            # the penalty sets the scale: a step of ∇/λ is the fixed-point iteration
            # e ← Jᵀ(Ψ(y+e) − t)/λ, which contracts wherever the objective is concave, whatever
            # δ is; the default step_size 2.0 gives that step, and halving tames the rest
            unit = torch.full_like(radius, settings.step_for(optimizer) / (2 * threat.penalty))
            self.step_length = _per_sample(unit, v)
        self.best_objective = torch.full_like(radius, -torch.inf)
        self.best_v = v.detach().clone()
        if optimizer == "pgd":
            self._update = _Compiled(_pgd_update, v.device)
            # per step: the window at a checkpoint (0 elsewhere) and whether it is the first
            windows = [0.0] * settings.steps
            for step, window in pgd_checkpoints(settings.steps).items():
                windows[step] = float(window)
            self.windows = torch.tensor(windows, dtype=v.dtype, device=v.device)
            self.firsts = torch.arange(settings.steps, device=v.device) == 0
            self.v_previous = v.detach().clone()
            self.objective_previous = torch.full_like(radius, -torch.inf)
            self.best_grad = torch.zeros_like(v)
            self.successes = torch.zeros_like(radius)
            self.checkpoint_best = torch.full_like(radius, -torch.inf)
            self.reduced_last = torch.zeros_like(radius, dtype=torch.bool)
        else:
            self._update = _Compiled(_fixed_step_update, v.device)
            self.first = torch.zeros_like(v)
            self.second = torch.zeros_like(v) if optimizer == "adam" else self.first
            beta1, beta2 = _ADAM_BETAS
            # Adam's bias corrections for every step, on the device once (no copy per step)
            self.corrections = torch.tensor(
                [[1 - beta1**t, 1 - beta2**t] for t in range(1, settings.steps + 1)],
                dtype=v.dtype,
                device=v.device,
            )

    def step(
        self, step: int, v: torch.Tensor, grad: torch.Tensor, objective: torch.Tensor
    ) -> torch.Tensor:
        if self.optimizer == "pgd":
            (
                v,
                self.best_objective,
                self.best_v,
                self.v_previous,
                self.objective_previous,
                self.best_grad,
                self.step_length,
                self.successes,
                self.checkpoint_best,
                self.reduced_last,
            ) = self._update(
                v,
                grad,
                objective,
                self.best_objective,
                self.best_v,
                self.v_previous,
                self.objective_previous,
                self.best_grad,
                self.step_length,
                self.successes,
                self.checkpoint_best,
                self.reduced_last,
                self.radius,
                self.mask,
                self.windows[step],
                self.firsts[step],
                self.penalized,
            )
            return v
        v, self.best_objective, self.best_v, self.first, self.second = self._update(
            v,
            grad,
            objective,
            self.best_objective,
            self.best_v,
            self.first,
            self.second,
            self.step_length,
            self.radius,
            self.mask,
            self.corrections[step],
            self.optimizer,
            self.penalized,
        )
        return v


def _random_starts(
    shape: tuple[int, ...],
    count: int,
    generators: Sequence[torch.Generator],
    space: _SearchSpace,
    radius: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`count` random points on each image's sphere (the maximiser of an error that grows with
    the perturbation lies on it), drawn from the image's own generator, in antithetic pairs
    d, −d: near a locally linear Ψ an ascent converges to ±(top direction) by the sign of its
    start's component along it, and a network's error at +v and −v can differ several-fold, so
    each pair reaches both.

    Each image draws from its own stream, so the starts do not depend on sharding or OOM
    halving, and the first draws are the same whatever `count`.
    Returns [count, B, *shape] on radius' device.
    """
    pairs = torch.stack(
        [
            torch.stack([torch.randn(shape, generator=gen, dtype=dtype) for gen in generators])
            for _ in range((count + 1) // 2)
        ]
    )
    directions = torch.stack([pair * sign for pair in pairs for sign in (1.0, -1.0)])[:count]
    directions = directions.to(radius.device)
    b = len(generators)
    flat = space.normalised(space.keep_in_range(directions.flatten(0, 1)))
    return (flat * _per_sample(radius[: count * b], flat)).view(count, b, *shape)


def worst_case_search(
    subject: Subject,
    operator: Operator,
    y: torch.Tensor,
    x: torch.Tensor,
    threat: ThreatModel,
    settings: SearchSettings,
    seeds: Sequence[int],
    should_stop: Callable[[], bool] = lambda: False,
) -> list[LevelOutcome]:
    """Search every level of the threat model for the worst perturbation of each image, with
    the search settings' optimiser and budget.

    `y` are the measurements [B, ...] of the ground truth `x` [B, C, H, W]; `seeds` give one
    random stream per image (initialisation of the restarts). Levels are searched from the
    smallest up, each warm-started from the previous one (the module's docstring); the outcomes
    come back in the order of `threat.levels` (only the levels finished when `should_stop` ended
    the search: the smallest ones).
    """
    if len(seeds) != y.shape[0]:
        raise ValueError("one seed per image")
    batch, restarts = y.shape[0], settings.restarts
    space = _SearchSpace(operator, threat.space)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    levels = threat.levels

    with torch.no_grad():
        clean = subject.reconstruct(y).detach() if threat.target == "reconstruction" else None
    target = x if clean is None else clean

    # restarts * images in the batch dimension: index = restart * B + image
    y_all = y.detach().repeat(restarts, *([1] * (y.dim() - 1)))
    target_all = target.detach().repeat(restarts, *([1] * (target.dim() - 1)))
    # the radius is relative to ‖x‖ in image space and to ‖y‖ in measurement space
    scale_source = x if space.in_image else y
    base_norm = space.norm(scale_source).detach()
    base_norm_all = base_norm.repeat(restarts)
    variable_shape = tuple(scale_source.shape[1:])

    def search(
        level: float, previous: _Found | None, scout: _Found | None
    ) -> tuple[LevelOutcome, _Found]:
        radius = level * base_norm_all
        start = _initial_points(
            previous,
            scout,
            threat.penalized,
            level,
            variable_shape,
            generators,
            space,
            radius,
            restarts,
            y.dtype,
        )
        # enable_grad: callers (the audit) may run checks under no_grad
        with torch.enable_grad():
            outcome, all_v, all_objective = _search_level(
                subject,
                space,
                threat,
                settings,
                y_all,
                target_all,
                radius,
                start,
                batch,
                should_stop,
                carried=previous is not None,
            )
        outcome.level = level
        return outcome, (level, all_v, all_objective)

    ascending = sorted(set(levels))
    scout: _Found | None = None
    scouted: LevelOutcome | None = None
    if len(ascending) > 1:
        # the scout: the largest level from random starts, so that the smallest level (the
        # first of the ascending pass) starts from its best, rescaled, rather than afresh
        scouted, scout = search(ascending[-1], None, None)
        if should_stop():
            return []
    found: dict[float, LevelOutcome] = {}
    previous: _Found | None = None
    for level in ascending:
        outcome, previous = search(level, previous, scout)
        if level == ascending[-1] and scouted is not None:
            # the scout searched this level too: per image, the worse of the two perturbations
            outcome = _worse(outcome, scouted)
        found[level] = outcome
        if should_stop():
            break
    return [found[level] for level in levels if level in found]


# a searched level: its δ, and every restart's best point and objective ([R * B, ...], [R * B])
_Found = tuple[float, torch.Tensor, torch.Tensor]


def _worse(outcome: LevelOutcome, scouted: LevelOutcome) -> LevelOutcome:
    """The largest level: per image, the perturbation with the larger objective of its ascending
    search and of the scout (both searched this level; ties go to the ascending search); the
    steps of both."""
    take = scouted.objective > outcome.objective  # [B]

    def pick(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
        return torch.where(_per_sample(take, ours), theirs, ours)

    chosen = take.tolist()
    return LevelOutcome(
        level=outcome.level,
        perturbation=pick(outcome.perturbation, scouted.perturbation),
        image_perturbation=(
            None
            if outcome.image_perturbation is None or scouted.image_perturbation is None
            else pick(outcome.image_perturbation, scouted.image_perturbation)
        ),
        objective=torch.where(take, scouted.objective, outcome.objective),
        steps=outcome.steps + scouted.steps,
        found_by=[
            theirs if t else ours
            for ours, theirs, t in zip(outcome.found_by, scouted.found_by, chosen, strict=True)
        ],
        carried=[c and not t for c, t in zip(outcome.carried, chosen, strict=True)],
    )


def _initial_points(
    previous: _Found | None,
    scout: _Found | None,
    penalized: bool,
    level: float,
    shape: tuple[int, ...],
    generators: Sequence[torch.Generator],
    space: _SearchSpace,
    radius: torch.Tensor,
    restarts: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[R * B, *shape]: ⌈R/2⌉ warm restarts from the level searched before (ranked per image),
    the rest afresh on the sphere.

    The warm restarts: the source's worst perturbation, its mirror image, then its next best
    ones, rescaled to this radius. The source is the smaller level just searched (`previous`):
    its worst then starts restart 0 AS IT IS (feasible here: its ball is inside this one;
    evaluated at this level's first step, its objective is a floor under this level's worst, so
    the levels' curve is monotone). The smallest level's source is the scout (the largest level
    searched from random starts). The mirror, −e: at a small level a network is near-linear and
    the error at ±e ties, at a larger one its curvature decides which side is worse, so both go
    up. A ball's maximiser scales with its radius; the penalised maximiser does not depend on δ
    (no rescaling)."""
    b = len(generators)
    keep = math.ceil(restarts / 2)
    source = previous if previous is not None else scout
    if source is None:
        return _random_starts(shape, restarts, generators, space, radius, dtype).flatten(0, 1)
    source_level, best_v, best_objective = source
    ranked = best_objective.view(restarts, b).argsort(dim=0, descending=True)  # [R, B]
    per_restart = best_v.view(restarts, b, *shape)
    images = torch.arange(b, device=ranked.device)
    scale = 1.0 if penalized else level / source_level
    worst = per_restart[ranked[0], images]
    others = [per_restart[ranked[k], images] * scale for k in range(1, keep - 1)]
    first = worst if previous is not None else worst * scale
    warm = torch.stack([first, -worst * scale, *others][:keep])
    if keep == restarts:
        return warm.flatten(0, 1)
    fresh = _random_starts(shape, restarts - keep, generators, space, radius[keep * b :], dtype)
    return torch.cat([warm, fresh]).flatten(0, 1)


def _search_level(
    subject: Subject,
    space: _SearchSpace,
    threat: ThreatModel,
    settings: SearchSettings,
    y_all: torch.Tensor,
    target_all: torch.Tensor,
    radius: torch.Tensor,
    start: torch.Tensor,
    batch: int,
    should_stop: Callable[[], bool],
    carried: bool = False,
) -> tuple[LevelOutcome, torch.Tensor, torch.Tensor]:
    """One level. Returns the outcome and every restart's best point and objective. `carried`:
    restart 0 starts at the smaller level's worst perturbation (as it is)."""
    penalized = threat.penalized
    v = start if penalized else space.into_ball(start, radius)
    initial = v
    # 1 on measured entries (the operator's projection is a mask), None in image space
    mask = None if space.in_image else space.keep_in_range(torch.ones_like(v[:1]))
    optimizers = settings.restart_optimizers()
    groups: list[_Group] = []
    for name in dict.fromkeys(optimizers):
        first = optimizers.index(name) * batch
        rows = slice(first, first + optimizers.count(name) * batch)
        groups.append(_Group(name, rows, v[rows], threat, settings, radius[rows], mask))
    early_stopping = settings.early_stop_tolerance > 0
    min_steps = settings.min_steps()
    # the iterates and best points at the previous check (the stopping rule's reference)
    last_v: torch.Tensor | None = None
    last_best: torch.Tensor | None = None
    steps_run = 0

    for step in range(settings.steps):
        v = v.detach().requires_grad_(True)
        e = space.to_measurement(v)
        misfit = (subject.reconstruct(y_all + e) - target_all).flatten(1).pow(2).sum(1)
        if penalized:
            objective = 0.5 * misfit - 0.5 * threat.penalty * space.norm(v).pow(2)
        else:
            objective = misfit
        (grad,) = torch.autograd.grad(objective.sum(), v)
        # the subject counts its forward passes itself (workers.engine.subjects)
        subject.counter.backward += v.shape[0]
        steps_run = step + 1

        with torch.no_grad():
            v_detached, objective = v.detach(), objective.detach()
            parts = [
                group.step(step, v_detached[group.rows], grad[group.rows], objective[group.rows])
                for group in groups
            ]
            v = parts[0] if len(parts) == 1 else torch.cat(parts)

        if steps_run % settings.check_every == 0:
            if early_stopping:
                with torch.no_grad():
                    best_now = torch.cat([group.best_v for group in groups])
                    if last_v is not None and last_best is not None and steps_run >= min_steps:
                        settled = _settled(space, v, last_v, best_now, last_best, radius, settings)
                        if bool(settled.all()):
                            break
                    last_v, last_best = v.detach().clone(), best_now
            if should_stop():
                break

    with torch.no_grad():
        best_objective = _best_objective(groups)
        best_v = torch.cat([group.best_v for group in groups])
        worst_restart = best_objective.view(-1, batch).argmax(0)  # [B]
        images = torch.arange(batch, device=worst_restart.device)
        chosen = best_v.view(-1, batch, *best_v.shape[1:])[worst_restart, images]
        objective = best_objective.view(-1, batch)[worst_restart, images]
        measurement = space.to_measurement(chosen)
        # the winner is restart 0 still at its start: the smaller level's perturbation
        unmoved = per_sample_norm(best_v[:batch] - initial[:batch]) == 0
        is_carried = (worst_restart == 0) & unmoved if carried else torch.zeros_like(unmoved)
    outcome = LevelOutcome(
        level=0.0,
        perturbation=measurement.detach(),
        image_perturbation=chosen.detach() if space.in_image else None,
        objective=objective.detach(),
        steps=steps_run,
        found_by=[optimizers[int(r)] for r in worst_restart.tolist()],
        carried=[bool(c) for c in is_carried.tolist()],
    )
    return outcome, best_v.detach(), best_objective.detach()


def _settled(
    space: _SearchSpace,
    v: torch.Tensor,
    last_v: torch.Tensor,
    best: torch.Tensor,
    last_best: torch.Tensor,
    radius: torch.Tensor,
    settings: SearchSettings,
) -> torch.Tensor:
    """[R * B]: the restarts whose iterate and best point both moved less than
    early_stop_tolerance × the scale (the radius, or ‖v‖ where larger: the penalised search)
    since the previous check."""
    scale = torch.maximum(radius, space.norm(best))
    tolerance = settings.early_stop_tolerance * scale
    moved = space.norm(v - last_v)
    improved = space.norm(best - last_best)
    return (moved < tolerance) & (improved < tolerance)


def _best_objective(groups: Sequence[_Group]) -> torch.Tensor:
    return torch.cat([group.best_objective for group in groups])
