"""Query-only worst-case search: the `worst_case` threat model searched with forward passes
alone, for a model whose gradients the audit cannot see (an endpoint model, docs/models.md,
"Endpoint models").

It maximises the same objective as the white-box search (workers.engine.attacks, the `ball`
formulation): ‖Ψ(y + e) − t‖² subject to ‖e‖ ≤ δ‖y‖ (measurement space, on the measured
entries) or ‖Ψ(y + A r) − t‖² subject to ‖r‖ ≤ δ‖x‖ (image space). A query returns the whole
reconstruction, not one score, and the search uses all of it: each step, for every restart of
every image,

1. **a linear model of the output in a guided subspace**: forward differences at the restart's
   best point v along an orthonormal basis Q of 2·`directions` + 1 directions, made of v itself,
   the restart's recent gradient estimates and random directions (on the measured entries),
   give J Q, the Jacobian on that subspace (exact on a locally linear model, from each
   difference's whole output; NES would keep one slope per direction). The gradient turns
   slowly along an ascent: on the reference U-Net at δ 5 % about 90 % of each white-box
   gradient lies in the span of the previous five, where a random subspace of the same size
   holds sqrt(k/n) of it. Differences made at the same point in earlier steps (while no
   candidate beat it) join the model, up to `kept_directions`;
2. **a trust-region step on it**: the model's maximiser of ‖Ψ(v) − t + J Q a‖ over ‖a‖ ≤ Δ (a
   k-dimensional trust-region problem, solved exactly), projected onto the ball, is the next
   candidate; Δ = `region_size` radii, halved after a candidate that did not raise the
   objective and doubled (up to the full size) after one that did. On a linear Ψ the subspace
   holds the power iteration's Krylov vectors and the step is their Rayleigh–Ritz maximiser:
   the search finds σ_max's direction within a few dozen steps.

Only candidates that raise the objective are kept, so each restart's best is monotone; levels
run from the smallest up, each warm-started from the previous level's best as the white-box
search does (restart 0 starts at it as it is, so the levels' curve is monotone). The budget per
image and level is restarts × (1 + steps × (2·directions + 2)) queries: per step one candidate
and 2·directions + 1 differences, and per restart its start (less where the searched entries
are fewer than 2·directions + 1: no more differences than entries). Nothing here needs gradients:
`subject.reconstruct` is only ever called under `torch.no_grad()`.

Written here rather than taken from a library: AutoAttack's Square and ART's attacks search
for a misclassification (a margin or a label), not for the largest ℓ2 reconstruction error of a
regression model within a ball, and neither takes our measurement-space constraints (the
measured entries, operator.norm). Measured against NES gradient estimates driving projected
ascent with Square-style proposals (the first version of this search) on the reference U-Net
at δ 5 %: 0.57 of the white-box worst case before, 0.78–0.87 per image with this one at the
same budget (0.93–1.01 and 0.94–0.98 at δ 1 % and 2 %; docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from workers.engine.attacks import (
    LevelOutcome,
    ThreatModel,
    _per_sample,
    _SearchSpace,
    per_sample_norm,
)
from workers.engine.context import Operator, Subject

_TINY = 1e-12


@dataclass(frozen=True)
class QuerySearchSettings:
    """The query-only search's budget: per image and level, restarts × (1 + steps ×
    (2·directions + 2)) queries (docs/reports.md, "worst_case": the query-only search)."""

    steps: int = 100
    restarts: int = 1
    directions: int = 65  # per step, 2·directions + 1 forward differences and one candidate
    jvp_step: float = 0.002  # the forward differences' step, relative to the radius
    history: int = 16  # gradient estimates that guide each restart's subspace
    region_size: float = 1.0  # the first trust region's radius, relative to the ball's
    kept_directions: int = 520  # differences at one point kept for its model, at most

    def queries_per_level(self, entries: int | None = None) -> int:
        """Per image and level; with `entries` (the searched entries) exactly, since a step
        makes no more differences than there are entries."""
        differences = 2 * self.directions + 1
        if entries is not None:
            differences = min(differences, entries)
        return self.restarts * (1 + self.steps * (differences + 1))


def _residual(
    subject: Subject,
    space: _SearchSpace,
    y: torch.Tensor,
    target: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """Ψ(y + e(v)) − t per row, flattened, in float64."""
    with torch.no_grad():
        out = subject.reconstruct(y + space.to_measurement(v))  # it counts its passes itself
        return (out - target).flatten(1).double()


def _project(space: _SearchSpace, v: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    return space.into_ball(v, radius)


def _onto_sphere(space: _SearchSpace, v: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    v = space.keep_in_range(v)
    scale = radius / space.norm(v).clamp_min(_TINY)
    return v * scale.view(-1, *([1] * (v.dim() - 1)))


class _GuidedSubspace:
    """Each row's subspace of the next forward differences: its point, its recent gradient
    estimates (the module's docstring, step 1), completed by random directions and
    orthonormalised. `active` marks the searched entries (the measured ones in measurement
    space); rows are restart-major (row = restart · images + image)."""

    def __init__(self, active: torch.Tensor, rows: int, history: int, dtype: torch.dtype) -> None:
        self.active = active
        self.size = history
        self.history = torch.zeros(rows, 0, int(active.sum()), dtype=dtype, device=active.device)

    def directions(
        self, v: torch.Tensor, count: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` orthonormal directions per row: ([rows, n, count] on the searched entries,
        [count, rows, *shape] in full)."""
        rows = v.shape[0]
        n = self.history.shape[-1]
        iterate = v.flatten(1)[:, self.active].unsqueeze(1).to(self.history.dtype)
        guided = torch.cat([self.history, iterate], 1)[:, : max(0, count - 1)]
        fresh = torch.randn(
            (rows, count - guided.shape[1], n), generator=generator, dtype=self.history.dtype
        ).to(v.device)
        basis, _ = torch.linalg.qr(torch.cat([guided, fresh], 1).transpose(1, 2))
        full = torch.zeros(count, rows, self.active.numel(), dtype=v.dtype, device=v.device)
        full[..., self.active] = basis.permute(2, 0, 1).to(v.dtype)
        return basis, full.view(count, *v.shape)

    def remember(self, estimates: torch.Tensor) -> None:
        """Add each row's gradient estimate ([rows, n], on the searched entries)."""
        unit = estimates / estimates.norm(dim=1, keepdim=True).clamp_min(_TINY)
        self.history = torch.cat([unit.unsqueeze(1).to(self.history.dtype), self.history], 1)
        self.history = self.history[:, : self.size]


def _residuals_at(
    subject: Subject,
    space: _SearchSpace,
    y_all: torch.Tensor,
    t_all: torch.Tensor,
    points: torch.Tensor,
) -> torch.Tensor:
    """The residuals at `points`: any whole number of copies of the rows, in one batch."""
    copies = points.shape[0] // y_all.shape[0]
    ys = y_all.repeat(copies, *([1] * (y_all.dim() - 1)))
    ts = t_all.repeat(copies, *([1] * (t_all.dim() - 1)))
    return _residual(subject, space, ys, ts, points)


def _ball_maximiser(model: torch.Tensor, offset: torch.Tensor, radius: float) -> torch.Tensor:
    """argmax ‖c + M w‖ over ‖w‖ ≤ radius (M [m, k], c [m]): on the sphere, w = −(MᵀM −
    λI)⁻¹Mᵀc with λ above MᵀM's largest eigenvalue, found by bisection on ‖w(λ)‖ = radius
    (the trust-region subproblem of a maximisation). Where Mᵀc vanishes along the top
    eigenvector (the hard case), the top eigenvector completes w to the sphere."""
    values, vectors = torch.linalg.eigh(model.T @ model)
    top = float(values[-1])
    projected = vectors.T @ (model.T @ offset)  # Mᵀc in the eigenbasis
    pull = float(projected.norm())
    if pull <= _TINY * max(top, 1.0):
        w = vectors[:, -1] * radius
        return w if float((offset + model @ w).norm()) >= float((offset - model @ w).norm()) else -w

    def at(shift: float) -> torch.Tensor:
        return -vectors @ (projected / (values - shift))

    low, high = top, top + pull / radius + _TINY
    for _ in range(80):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if float(at(middle).norm()) > radius else (low, middle)
    w = at(high)
    norm = float(w.norm())
    if norm < radius * (1 - 1e-6):  # the hard case: complete along the top eigenvector
        extra = math.sqrt(max(radius**2 - norm**2, 0.0))
        candidates = [w + extra * vectors[:, -1], w - extra * vectors[:, -1]]
        w = max(candidates, key=lambda c: float((offset + model @ c).norm()))
    return w


def _orthonormal_model(
    measured: torch.Tensor, model: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From directions D [n, k] (unit columns, possibly repeated: the point itself is in every
    step's basis) and their differences J D [m, k]: an orthonormal basis U of span D and J U.
    Through the eigendecomposition of DᵀD, which stays exact where D has repeated or nearly
    repeated columns (an SVD of D may fail to converge there): D V = U S, so U = D V S⁻¹ and
    J U = (J D) V S⁻¹, keeping the directions with S² above 1e-10 of the largest."""
    values, vectors = torch.linalg.eigh(measured.T @ measured)
    keep = values > 1e-10 * float(values[-1])
    scale = values[keep].sqrt()
    return measured @ vectors[:, keep] / scale, model @ vectors[:, keep] / scale


def _ascend_in_subspaces(
    guide: _GuidedSubspace,
    subject: Subject,
    space: _SearchSpace,
    settings: QuerySearchSettings,
    y_all: torch.Tensor,
    t_all: torch.Tensor,
    v: torch.Tensor,
    radius: torch.Tensor,
    generator: torch.Generator,
    should_stop: Callable[[], bool],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One level's ascent by subspace trust regions (the module's docstring, steps 1 and 2).
    Per step and row: the last candidate's query, then 2·`directions` + 1 forward differences
    at the row's best point along the guide's basis Q; the differences kept at that point are
    orthonormalised with them (_orthonormal_model: a direction in two bases counts once), and
    the model Ψ(v + Q a) ≈ Ψ(v) + (J Q) a gives the next candidate, its maximiser over ‖a‖ ≤ Δ
    (_ball_maximiser) projected onto the ball. Returns every row's best point, its objective
    and the steps run."""
    rows, dtype = v.shape[0], v.dtype
    # no more directions than searched entries (an orthonormal basis of them all): small
    # inputs spend less than the budget
    differences = min(2 * settings.directions + 1, int(guide.active.sum()))
    h = settings.jvp_step * radius  # [rows]
    best_v = v
    best_residual = _residuals_at(subject, space, y_all, t_all, v)
    best_f = best_residual.pow(2).sum(1)
    reach = torch.ones(rows, dtype=torch.float64, device=v.device)
    candidate: torch.Tensor | None = None
    kept: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * rows
    steps_run = 0
    for k in range(settings.steps):
        steps_run = k + 1
        if candidate is not None:
            residual = _residuals_at(subject, space, y_all, t_all, candidate)
            f = residual.pow(2).sum(1)
            better = f > best_f
            reach = torch.where(better, (reach * 2).clamp(max=1.0), reach / 2)
            best_v = torch.where(_per_sample(better, v), candidate, best_v)
            best_residual = torch.where(better.unsqueeze(1), residual, best_residual)
            best_f = torch.where(better, f, best_f)
            kept = [
                None if moved else pair for moved, pair in zip(better.tolist(), kept, strict=True)
            ]
        basis, u = guide.directions(best_v, differences, generator)
        shifted = _residuals_at(
            subject,
            space,
            y_all,
            t_all,
            (best_v.unsqueeze(0) + _per_sample(h, v).unsqueeze(0) * u).flatten(0, 1),
        )
        changes = shifted.view(differences, rows, -1) - best_residual
        changes = changes / h.double().view(1, -1, 1)  # [k, rows, m]: J q
        moves, estimates = [], []
        for row in range(rows):
            # this step's differences, and those made before at the same point (no candidate
            # has beaten it since): the linear model grows while the point stays
            earlier = kept[row]
            measured, model = basis[row], changes[:, row].T  # [n, k], [m, k]: Q and J Q
            if earlier is not None:
                measured = torch.cat([earlier[0], measured], 1)[:, -settings.kept_directions :]
                model = torch.cat([earlier[1], model], 1)[:, -settings.kept_directions :]
            kept[row] = (measured, model)
            orthonormal, model = _orthonormal_model(measured, model)
            estimates.append(orthonormal @ (2 * model.T @ best_residual[row]))
            region = float(reach[row]) * float(radius[row]) * settings.region_size
            moves.append(orthonormal @ _ball_maximiser(model, best_residual[row], region))
        guide.remember(torch.stack(estimates))  # the gradients join the history
        move = torch.zeros(rows, guide.active.numel(), dtype=dtype, device=v.device)
        move[:, guide.active] = torch.stack(moves).to(dtype)
        candidate = _project(space, best_v + move.view_as(v), radius)
        if should_stop():
            break
    if candidate is not None:  # the restart's extra query: the last candidate
        f = _residuals_at(subject, space, y_all, t_all, candidate).pow(2).sum(1)
        better = f > best_f
        best_v = torch.where(_per_sample(better, v), candidate, best_v)
        best_f = torch.where(better, f, best_f)
    return best_v, best_f, steps_run


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
    y_all = y.detach().repeat(restarts, *([1] * (y.dim() - 1)))
    t_all = target.repeat(restarts, *([1] * (target.dim() - 1)))
    dtype = y.dtype

    found: dict[float, LevelOutcome] = {}
    previous: tuple[float, torch.Tensor, torch.Tensor] | None = None  # level, best v, f
    # the searched entries: all in image space, the measured ones in measurement space
    active = space.keep_in_range(torch.ones((1, *shape), dtype=dtype, device=y.device))
    active = active.flatten() != 0
    guide = _GuidedSubspace(active, restarts * batch, settings.history, torch.float64)
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
        initial = v.clone()
        v, f, steps_run = _ascend_in_subspaces(
            guide, subject, space, settings, y_all, t_all, v, radius, generator, should_stop
        )
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
