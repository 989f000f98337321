"""Query-only worst-case search: the `worst_case` threat model searched with forward passes
alone, for a model whose gradients the audit cannot see (an endpoint model, docs/models.md,
"Endpoint models").

It maximises the same objective as the white-box search (workers.engine.attacks, the `ball`
formulation): ‖Ψ(y + e) − t‖² subject to ‖e‖ ≤ δ‖y‖ (measurement space, on the measured
entries) or ‖Ψ(y + A r) − t‖² subject to ‖r‖ ≤ δ‖x‖ (image space). Each step, for every
restart of every image:

1. **a gradient estimate from antithetic finite differences** (NES / SPSA): `directions`
   Gaussian directions u (on the measured entries), Ψ evaluated at v ± σu, and
   ĝ = Σ (f(v + σu) − f(v − σu)) / (2σ) · u / directions, an unbiased estimate of ∇f on a
   quadratic f (central differences are exact there) with σ = `smoothing` × the radius;
2. **the white-box default's projected ascent on it**: the candidate v + η·radius·ĝ/‖ĝ‖ projected
   onto the ball, η the step (first `step_size` radii, halved whenever a step does not raise
   the objective, as APGD halves), kept only if it raises the objective;
3. **a random-search proposal in the style of Square attack (ℓ2)**: mass moved into a random
   square window (image space) or a random block of entries (measurement space), of side
   shrinking with the steps, renormalised onto the sphere, kept only if it raises the
   objective.

Every accepted point raises the objective, so each restart's best is its iterate; levels run
from the smallest up, each warm-started from the previous level's best as the white-box search
does (restart 0 starts at it as it is, so the levels' curve is monotone). The budget per image
and level is steps × restarts × (2·directions + 2) queries, plus one per restart to evaluate
its start. Nothing here needs gradients: `subject.reconstruct` is only ever called under
`torch.no_grad()`.

Written here rather than taken from a library: AutoAttack's Square and ART's attacks search
for a misclassification (a margin or a label), not for the largest ℓ2 reconstruction error of a
regression model within a ball, and neither takes our measurement-space constraints (the
measured entries, operator.norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from workers.engine.attacks import LevelOutcome, ThreatModel, _SearchSpace, per_sample_norm
from workers.engine.context import Operator, Subject

_TINY = 1e-12


@dataclass(frozen=True)
class QuerySearchSettings:
    """The query-only search's budget: per image and level, steps × restarts × (2·directions
    + 2) queries (docs/reports.md, "worst_case": the query-only search)."""

    steps: int = 100
    restarts: int = 2
    directions: int = 32  # antithetic pairs per gradient estimate
    smoothing: float = 0.01  # σ of the finite differences, relative to the radius
    step_size: float = 2.0  # the ascent's first step, relative to the radius
    square_fraction: float = 0.25  # the first proposal window's share of the entries
    proposal_size: float = 0.5  # the random-search proposal's norm, relative to the radius
    momentum: float = 0.5  # weight of the earlier estimates in the ascent's direction

    def queries_per_level(self) -> int:
        return self.restarts * (1 + self.steps * (2 * self.directions + 2))


def _objective(
    subject: Subject,
    space: _SearchSpace,
    y: torch.Tensor,
    target: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """f(v) = ‖Ψ(y + e(v)) − t‖² per row, with y and t repeated to v's rows."""
    with torch.no_grad():
        out = subject.reconstruct(y + space.to_measurement(v))  # it counts its passes itself
        return (out - target).flatten(1).pow(2).sum(1).double()


def _project(space: _SearchSpace, v: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    return space.into_ball(v, radius)


def _onto_sphere(space: _SearchSpace, v: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    v = space.keep_in_range(v)
    scale = radius / space.norm(v).clamp_min(_TINY)
    return v * scale.view(-1, *([1] * (v.dim() - 1)))


def _square_proposal(
    shape: tuple[int, ...], rows: int, side_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """[rows, *shape]: Gaussian noise inside one random square window of the last two axes
    (all leading channels), zero elsewhere; side ≈ sqrt(fraction) × the smaller side."""
    proposal = torch.zeros(rows, *shape, dtype=torch.float64)
    height, width = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1])
    side = max(1, round(math.sqrt(side_fraction) * min(height, width)))
    for row in range(rows):
        top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
        patch = torch.randn(*shape[:-2], side, side, generator=generator, dtype=torch.float64)
        if len(shape) >= 2:
            proposal[row, ..., top : top + side, left : left + side] = patch
        else:
            proposal[row, left : left + side] = patch.flatten()[:side]
    return proposal


def query_worst_case_search(
    subject: Subject,
    operator: Operator,
    y: torch.Tensor,
    x: torch.Tensor,
    threat: ThreatModel,
    settings: QuerySearchSettings,
    seeds: Sequence[int],
    should_stop: Callable[[], bool] = lambda: False,
    on_level: Callable[[float], None] | None = None,
) -> list[LevelOutcome]:
    """`workers.engine.attacks.worst_case_search` with queries only: the same threat model (the
    ball formulation), the same outcomes (one per level, in `threat.levels`' order).

    `on_level(level)` is called as each level's search starts (levels ascending; the clean
    reconstruction before the first is not in any level): an endpoint model charges the queries
    that follow to that level."""
    if threat.penalized:
        raise ValueError("the query-only search solves the ball formulation only")
    if len(seeds) != y.shape[0]:
        raise ValueError("one seed per image")
    batch, restarts = y.shape[0], settings.restarts
    space = _SearchSpace(operator, threat.space)
    generator = torch.Generator().manual_seed(int(seeds[0]) ^ (len(seeds) << 32))
    per_image = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        clean = subject.reconstruct(y) if threat.target == "reconstruction" else None
    target = (x if clean is None else clean).detach()
    scale_source = x if space.in_image else y
    shape = tuple(scale_source.shape[1:])
    base_norm = space.norm(scale_source).detach()
    rows = restarts * batch  # index = restart * B + image
    y_all = y.detach().repeat(restarts, *([1] * (y.dim() - 1)))
    t_all = target.repeat(restarts, *([1] * (target.dim() - 1)))
    dtype = y.dtype

    found: dict[float, LevelOutcome] = {}
    previous: tuple[float, torch.Tensor, torch.Tensor] | None = None  # level, best v, f
    for level in sorted(set(threat.levels)):
        if on_level is not None:
            on_level(level)
        radius = (level * base_norm).repeat(restarts).to(dtype)
        # starts: restart 0 at the smaller level's worst as it is, the others random
        starts = torch.stack(
            [
                torch.stack([torch.randn(shape, generator=gen, dtype=dtype) for gen in per_image])
                for _ in range(restarts)
            ]
        ).flatten(0, 1)
        v = _onto_sphere(space, starts.to(y.device), radius)
        if previous is not None:
            prev_level, prev_v, prev_f = previous
            winner = prev_f.view(restarts, batch).argmax(0)
            images = torch.arange(batch, device=prev_v.device)
            best_prev = prev_v.view(restarts, batch, *shape)[winner, images]
            v[:batch] = best_prev
            if restarts > 1:  # its mirror, rescaled to this level
                v[batch : 2 * batch] = -best_prev * (level / prev_level)
        f = _objective(subject, space, y_all, t_all, v)
        initial = v.clone()
        step = torch.full((rows,), settings.step_size, dtype=torch.float64, device=y.device)
        steps_run = 0
        momentum: torch.Tensor | None = None

        def per_row(t: torch.Tensor) -> torch.Tensor:
            return t.view(-1, *([1] * len(shape)))

        def unit(t: torch.Tensor) -> torch.Tensor:
            return t / per_row(per_sample_norm(t).clamp_min(_TINY))

        def objective(points: torch.Tensor) -> torch.Tensor:
            copies = points.shape[0] // rows
            ys = y_all.repeat(copies, *([1] * (y.dim() - 1)))
            ts = t_all.repeat(copies, *([1] * (target.dim() - 1)))
            return _objective(subject, space, ys, ts, points)

        for k in range(settings.steps):
            steps_run = k + 1
            # 1. antithetic finite differences along `directions` Gaussian directions
            q = settings.directions
            u = torch.randn((q * rows, *shape), generator=generator, dtype=dtype).to(y.device)
            u = space.keep_in_range(u).view(q, rows, *shape)
            sigma = settings.smoothing * radius  # [rows]
            shift = per_row(sigma).unsqueeze(0) * u
            values = objective(torch.cat([v + shift, v - shift]).flatten(0, 1)).view(2, q, rows)
            slope = (values[0] - values[1]) / (2 * sigma.double())  # [q, rows]: ∇f·u
            grad = (slope.view(q, rows, *([1] * len(shape))) * u.double()).mean(0)
            # 2. projected ascent along the estimates' running average (momentum: the noise of
            # one estimate averages out over the steps, where the gradient changes slowly)
            momentum = unit(grad) if momentum is None else settings.momentum * momentum + unit(grad)
            reach = per_row(step * radius.double())
            candidate = _project(space, (v.double() + reach * unit(momentum)).to(dtype), radius)
            # 3. a Square-style random-search proposal, renormalised onto the sphere
            fraction = settings.square_fraction * (1.0 - k / settings.steps) + 1e-3
            patch = unit(_square_proposal(shape, rows, fraction, generator).to(y.device))
            moved = v + (patch * per_row(settings.proposal_size * radius.double())).to(dtype)
            proposal = _onto_sphere(space, moved, radius)
            both = objective(torch.cat([candidate, proposal])).view(2, rows)
            step = torch.where(both[0] > f, step, step / 2).clamp_min(1e-3)
            ascent_wins = both[0] >= both[1]
            best_new = torch.where(ascent_wins, both[0], both[1])
            pick = torch.where(per_row(ascent_wins), candidate, proposal)
            improved = best_new > f
            v = torch.where(per_row(improved), pick, v)
            f = torch.where(improved, best_new, f)
            if should_stop():
                break
        winner = f.view(restarts, batch).argmax(0)
        images = torch.arange(batch, device=winner.device)
        chosen = v.view(restarts, batch, *shape)[winner, images]
        unmoved = per_sample_norm(v[:batch] - initial[:batch]) == 0
        carried = (winner == 0) & unmoved if previous is not None else torch.zeros_like(unmoved)
        found[level] = LevelOutcome(
            level=level,
            perturbation=space.to_measurement(chosen).detach(),
            image_perturbation=chosen.detach() if space.in_image else None,
            objective=f.view(restarts, batch)[winner, images].to(dtype),
            steps=steps_run,
            found_by=["query"] * batch,
            carried=[bool(c) for c in carried.tolist()],
        )
        previous = (level, v.detach(), f)
        if should_stop():
            break
    return [found[level] for level in threat.levels if level in found]
