"""Worst-case perturbation search: projected gradient ascent on the reconstruction error.

For a sweep of relative levels δ it looks for a perturbation that maximises

- `ball`:      ‖Ψ(y + e) − t‖²                 subject to ‖e‖ ≤ δ‖y‖   (measurement space), or
               ‖Ψ(y + A r) − t‖²               subject to ‖r‖ ≤ δ‖x‖   (image space, e = A r);
- `penalized`: ½‖Ψ(y + e) − t‖² − λ/2‖v‖²      with v = e or r, no ball (δ only sets the scale of
               the initialisation and of the steps),

where t is the ground truth x or the clean reconstruction Ψ(y). Measurement-space perturbations
are kept on the measured entries (operator.project) and measured with operator.norm.

Speed is the point of this module (robust-nets' `find_adversarial.py` runs restarts one after
another with a fixed step count). Here restarts and images share ONE forward/backward per step
(batch index = restart * B + image), each level is warm-started from the previous level's best
perturbation, and a level stops early once the best objective stops improving. The loop never
syncs with the device except at the early-stopping checks, every `check_every` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from schemas.checks import WorstCaseCheck
from workers.engine.context import Operator, Subject

_ADAM_BETAS = (0.9, 0.999)
_MOMENTUM = 0.5  # larger values lag on the sphere: the buffer keeps stale radial parts
_TINY = 1e-12


@dataclass(frozen=True)
class SearchSettings:
    """The search's knobs; `from_check` reads them from the API's WorstCaseCheck."""

    space: Literal["measurement", "image"] = "measurement"
    target: Literal["ground_truth", "reconstruction"] = "ground_truth"
    formulation: Literal["ball", "penalized"] = "ball"
    penalty: float = 1.0
    optimizer: Literal["adam", "momentum"] = "adam"
    steps: int = 50
    restarts: int = 2
    step_size: float = 0.1  # relative to the radius δ‖y‖ (or δ‖x‖)
    early_stop_tolerance: float = 1e-3  # 0 disables early stopping
    check_every: int = 10  # steps between early-stopping checks (the only device syncs)

    @classmethod
    def from_check(cls, config: WorstCaseCheck) -> SearchSettings:
        return cls(
            space=config.space,
            target=config.target,
            formulation=config.formulation,
            penalty=config.lambda_,
            optimizer=config.optimizer,
            steps=config.steps,
            restarts=config.restarts,
            step_size=config.step_size,
            early_stop_tolerance=config.early_stop_tolerance,
            check_every=max(1, min(10, config.steps // 5)),
        )


@dataclass
class LevelOutcome:
    """The worst restart per image at one level (all tensors detached, batch first)."""

    level: float
    perturbation: torch.Tensor  # e in measurement space, [B, *measurement_shape]
    image_perturbation: torch.Tensor | None  # r when the search ran in image space
    objective: torch.Tensor  # [B], the search objective at the returned perturbation
    steps: int  # steps run before the level stopped


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


def _ascent_update(
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
    """One step after the gradient: keep the best point, move along a normalised Adam or
    heavy-ball direction by a fixed length (step_size × radius), project back onto the ball.

    A pure function of tensors, so that on a GPU it compiles into a few fused kernels instead
    of ~20 launches that would cost as much as the network's pass at small batches. `mask`
    (1 on measured entries) is None in image space; `corrections` holds Adam's bias
    corrections as a tensor so that the compiled function is not specialised per step.
    """
    improved = objective > best_objective
    best_objective = torch.where(improved, objective, best_objective)
    best_v = torch.where(_per_sample(improved, v), v, best_v)
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
    v = v + step_length * direction
    if not penalized:
        if mask is not None:
            v = v * mask
        v = v * _per_sample((radius / per_sample_norm(v).clamp_min(_TINY)).clamp(max=1.0), v)
    return v, best_objective, best_v, first, second


class _Updater:
    """`_ascent_update`, compiled with torch.compile on CUDA (eager elsewhere, and as a
    fallback wherever compilation is unavailable)."""

    def __init__(self, device: torch.device) -> None:
        self._fn: Callable[..., tuple[torch.Tensor, ...]] = _ascent_update
        self._compiled = device.type == "cuda"
        if self._compiled:
            self._fn = torch.compile(_ascent_update, dynamic=False)

    def __call__(self, *args: object) -> tuple[torch.Tensor, ...]:
        try:
            return self._fn(*args)
        except Exception:  # no triton / compiler: the eager function gives the same result
            if not self._compiled:
                raise
            self._fn, self._compiled = _ascent_update, False
            return self._fn(*args)


def _random_starts(
    shape: tuple[int, ...],
    restarts: Sequence[int],
    generators: Sequence[torch.Generator],
    space: _SearchSpace,
    radius: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Random points inside each image's ball, drawn from the image's own generator.

    Each image draws its restarts in order, so restart 0 is the same whatever the number of
    restarts or the batch an image is in (results do not depend on sharding or OOM halving).
    Returns [len(restarts), B, *shape] on radius' device.
    """
    draws = [
        [
            (
                torch.randn(shape, generator=gen, dtype=dtype),
                torch.rand((), generator=gen, dtype=dtype),
            )
            for gen in generators
        ]
        for _ in restarts
    ]
    directions = torch.stack([torch.stack([d for d, _ in row]) for row in draws])
    fractions = torch.stack([torch.stack([u for _, u in row]) for row in draws])
    directions = directions.to(radius.device)
    fractions = fractions.to(radius.device)
    b = len(generators)
    flat = space.normalised(space.keep_in_range(directions.flatten(0, 1)))
    scale = fractions.flatten() * radius[: len(restarts) * b]
    return (flat * _per_sample(scale, flat)).view(len(restarts), b, *shape)


def worst_case_search(
    subject: Subject,
    operator: Operator,
    y: torch.Tensor,
    x: torch.Tensor,
    levels: Sequence[float],
    settings: SearchSettings,
    seeds: Sequence[int],
    should_stop: Callable[[], bool] = lambda: False,
) -> list[LevelOutcome]:
    """Search each level in turn for the worst perturbation of each image.

    `y` are the measurements [B, ...] of the ground truth `x` [B, C, H, W]; `seeds` give one
    random stream per image (initialisation of the restarts).
    """
    if len(seeds) != y.shape[0]:
        raise ValueError("one seed per image")
    batch, restarts = y.shape[0], settings.restarts
    space = _SearchSpace(operator, settings.space)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    with torch.no_grad():
        clean = subject.reconstruct(y).detach() if settings.target == "reconstruction" else None
    target = x if clean is None else clean

    # restarts * images in the batch dimension: index = restart * B + image
    y_all = y.detach().repeat(restarts, *([1] * (y.dim() - 1)))
    target_all = target.detach().repeat(restarts, *([1] * (target.dim() - 1)))
    # the radius is relative to ‖x‖ in image space and to ‖y‖ in measurement space
    scale_source = x if space.in_image else y
    base_norm = space.norm(scale_source).detach()
    base_norm_all = base_norm.repeat(restarts)
    variable_shape = tuple(scale_source.shape[1:])

    outcomes: list[LevelOutcome] = []
    previous: tuple[float, torch.Tensor] | None = None
    for level in levels:
        # enable_grad: callers (the audit) may run checks under no_grad
        radius = level * base_norm_all
        with torch.enable_grad():
            outcome, best_v = _search_level(
                subject,
                space,
                settings,
                y_all,
                target_all,
                radius,
                _initial_points(
                    previous, level, variable_shape, generators, space, radius, restarts, y.dtype
                ),
                batch,
                should_stop,
            )
        outcome.level = level
        outcomes.append(outcome)
        previous = (level, best_v)
        if should_stop():
            break
    return outcomes


def _initial_points(
    previous: tuple[float, torch.Tensor] | None,
    level: float,
    shape: tuple[int, ...],
    generators: Sequence[torch.Generator],
    space: _SearchSpace,
    radius: torch.Tensor,
    restarts: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[R * B, *shape]: restart 0 warm-starts from the previous level's best, rescaled."""
    if previous is None:
        return _random_starts(shape, range(restarts), generators, space, radius, dtype).flatten(
            0, 1
        )
    previous_level, best_v = previous
    warm = (best_v * (level / previous_level)).unsqueeze(0)
    if restarts == 1:
        return warm.flatten(0, 1)
    b = len(generators)
    fresh = _random_starts(shape, range(1, restarts), generators, space, radius[b:], dtype)
    return torch.cat([warm, fresh]).flatten(0, 1)


def _search_level(
    subject: Subject,
    space: _SearchSpace,
    settings: SearchSettings,
    y_all: torch.Tensor,
    target_all: torch.Tensor,
    radius: torch.Tensor,
    start: torch.Tensor,
    batch: int,
    should_stop: Callable[[], bool],
) -> tuple[LevelOutcome, torch.Tensor]:
    penalized = settings.formulation == "penalized"
    v = start if penalized else space.into_ball(start, radius)
    step_length = _per_sample(settings.step_size * radius, v)
    # 1 on measured entries (the operator's projection is a mask), None in image space
    mask = None if space.in_image else space.keep_in_range(torch.ones_like(v[:1]))
    update = _Updater(v.device)
    first = torch.zeros_like(v)
    second = torch.zeros_like(v) if settings.optimizer == "adam" else first
    beta1, beta2 = _ADAM_BETAS
    # Adam's bias corrections for every step, on the device once (no copy per step)
    corrections = torch.tensor(
        [[1 - beta1**t, 1 - beta2**t] for t in range(1, settings.steps + 1)],
        dtype=v.dtype,
        device=v.device,
    )
    best_objective = torch.full_like(radius, -torch.inf)
    best_v = v.detach().clone()
    last_checked: torch.Tensor | None = None
    steps_run = 0

    for step in range(settings.steps):
        v = v.detach().requires_grad_(True)
        e = space.to_measurement(v)
        misfit = (subject.reconstruct(y_all + e) - target_all).flatten(1).pow(2).sum(1)
        if penalized:
            objective = 0.5 * misfit - 0.5 * settings.penalty * space.norm(v).pow(2)
        else:
            objective = misfit
        (grad,) = torch.autograd.grad(objective.sum(), v)
        # the subject counts its forward passes itself (workers.engine.subjects)
        subject.counter.backward += v.shape[0]
        steps_run = step + 1

        with torch.no_grad():
            v, best_objective, best_v, first, second = update(
                v.detach(),
                grad,
                objective.detach(),
                best_objective,
                best_v,
                first,
                second,
                step_length,
                radius,
                mask,
                corrections[step],
                settings.optimizer,
                penalized,
            )

        if steps_run % settings.check_every == 0:
            per_image = best_objective.view(-1, batch).amax(0)
            if last_checked is not None and settings.early_stop_tolerance > 0:
                gain = (per_image - last_checked) / last_checked.abs().clamp_min(_TINY)
                if bool((gain < settings.early_stop_tolerance).all()):
                    break
            last_checked = per_image
            if should_stop():
                break

    with torch.no_grad():
        worst_restart = best_objective.view(-1, batch).argmax(0)  # [B]
        images = torch.arange(batch, device=worst_restart.device)
        chosen = best_v.view(-1, batch, *best_v.shape[1:])[worst_restart, images]
        objective = best_objective.view(-1, batch)[worst_restart, images]
        measurement = space.to_measurement(chosen)
    outcome = LevelOutcome(
        level=0.0,
        perturbation=measurement.detach(),
        image_perturbation=chosen.detach() if space.in_image else None,
        objective=objective.detach(),
        steps=steps_run,
    )
    return outcome, chosen.detach()
