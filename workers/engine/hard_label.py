"""The hard-label (decision-based) minimal-perturbation search of a query-only classifier:
HopSkipJump (Chen, Jordan & Wainwright, 2020), as the Adversarial Robustness Toolbox (ART)
implements it, on the model's predicted class alone (docs/models.md, "Endpoint models").

The model is queried through ART's `BlackBoxClassifier`, one forward pass per input under
`torch.no_grad()`; no gradient is ever asked for. Seeded and reproducible: the starting points
are drawn here from `seed` (ART draws its own from an unseeded generator, so we hand them in)
and ART's random directions come from NumPy's global generator, seeded for the call and
restored afterwards. Every point found is bisected once more onto the decision boundary along
the segment from the input (ART stops after a step away from it) and then verified by the
caller.

A point found is adversarial, so its norm is an upper bound of the input's minimal norm; the
minimal one may be smaller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

ATTACK = "hopskipjump"


@dataclass(frozen=True)
class HopSkipJumpBudget:
    """HopSkipJump's budget per input (`settings()` is what the report shows).

    HopSkipJump is local: from its start it converges to a nearest point of the part of the
    boundary it reaches, which on a model of several classes need not be the nearest part (on
    linear 3- and 10-class models, one start in six ended 1.05-1.43× above the exact norm). So
    each input starts from up to `starts` points of distinct predicted classes (the other
    inputs of the batch first, whose classes are known; then uniform random points of the box,
    at most init_size drawn), `explore_iter` iterations from each; its `finalists` nearest
    points go on for `finalist_iter` more, and the nearest of those to `max_iter` iterations in
    all (ART's `resume`: step sizes and estimate sizes carry on). A gradient estimate takes
    init_eval·√t queries at iteration t, at most max_eval; each iteration's bisections some 15
    single-input queries. At the defaults an input costs about 25,000 queries on a 10-class
    model and 19,500 on a 3-class one: 8 inputs of a 64-pixel linear model take about a second
    in-process on one core, one digit of the 28×28 reference CNN (examples/classifier) about
    5 s; an endpoint's time is its requests'."""

    max_iter: int = 40  # iterations in all: bisection, gradient estimate, geometric step
    max_eval: int = 1_000  # most queries of one gradient estimate
    init_eval: int = 100  # queries of the first gradient estimate (× √t at iteration t)
    init_size: int = 100  # random points of the box drawn per input, at most, for the starts
    starts: int = 9  # starting points (of distinct predicted classes) per input, at most
    explore_iter: int = 4  # iterations from each start
    finalists: int = 3  # the nearest candidates of each input after them
    finalist_iter: int = 4  # more iterations from each finalist before the nearest goes on
    batch_size: int = 256  # inputs per call to the model (the endpoint splits larger ones)
    refine_steps: int = 24  # the final bisection onto the boundary: to 2⁻²⁴ of the distance

    def __post_init__(self) -> None:
        if self.explore_iter < 1 or self.finalist_iter < 0:
            raise ValueError("explore_iter is at least 1, finalist_iter at least 0")
        if self.explore_iter + self.finalist_iter > self.max_iter:
            raise ValueError("explore_iter + finalist_iter is at most max_iter")
        if min(self.max_eval, self.init_eval, self.init_size, self.starts, self.batch_size) < 1:
            raise ValueError("every HopSkipJump budget is positive")

    def stages(self) -> list[tuple[int, int]]:
        """(candidates kept per input, iterations) of each stage, the nearest last."""
        stages = [(self.starts, self.explore_iter), (self.finalists, self.finalist_iter)]
        stages.append((1, self.max_iter - self.explore_iter - self.finalist_iter))
        return [(keep, iterations) for keep, iterations in stages if iterations > 0]

    def settings(self) -> dict[str, int]:
        return asdict(self)


DEFAULT_BUDGET = HopSkipJumpBudget()


@dataclass
class HardLabelOutcome:
    points: torch.Tensor  # [B, ...] on the unit box; the input itself where nothing was found
    found: list[bool]  # an adversarial point found (the caller verifies it once more)


@contextmanager
def _numpy_seeded(*entropy: int) -> Iterator[None]:
    """ART draws from NumPy's global generator: seed it, restore it afterwards."""
    state = np.random.get_state()
    np.random.seed(np.random.SeedSequence(list(entropy)).generate_state(8))
    try:
        yield
    finally:
        np.random.set_state(state)


def hop_skip_jump(
    model: Callable[[torch.Tensor], torch.Tensor],
    u: torch.Tensor,
    labels: torch.Tensor,
    norm: str,
    num_classes: int,
    seed: int,
    budget: HopSkipJumpBudget = DEFAULT_BUDGET,
) -> HardLabelOutcome:
    """Untargeted HopSkipJump in `norm` ('l2' or 'linf') on inputs `u` in the unit box [0, 1]
    that `model` (logits on the unit box) classifies as `labels`."""
    from art.attacks.evasion.hop_skip_jump import HopSkipJump
    from art.estimators.classification.blackbox import BlackBoxClassifier

    if norm not in ("l2", "linf"):
        raise ValueError(f"HopSkipJump searches l2 or linf, not {norm!r}")
    device = u.device

    def predict(x: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        with torch.no_grad():
            logits = model(batch)
        return logits.detach().to("cpu", torch.float32).numpy()

    def classes(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = [
                model(x[i : i + budget.batch_size]).argmax(dim=1)
                for i in range(0, len(x), budget.batch_size)
            ]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=device)

    def as_numpy(x: torch.Tensor) -> np.ndarray:
        return x.detach().to("cpu", torch.float32).numpy()

    attack = HopSkipJump(
        BlackBoxClassifier(
            predict, input_shape=tuple(u.shape[1:]), nb_classes=num_classes, clip_values=(0.0, 1.0)
        ),
        batch_size=budget.batch_size,
        targeted=False,
        norm=2 if norm == "l2" else np.inf,
        max_iter=budget.explore_iter,
        max_eval=budget.max_eval,
        init_eval=budget.init_eval,
        init_size=budget.init_size,
        verbose=False,
    )
    points = u.clone()
    owners, current = _starting_points(classes, u, labels, seed, budget)
    done = 0  # iterations run on every candidate still in the race
    for stage, (keep, iterations) in enumerate(budget.stages()):
        if not owners:
            break
        # the `keep` nearest candidates of every input go on (resumed: the iteration count,
        # the step sizes and the gradient estimates' sizes carry on)
        owners, current = _nearest(owners, current, u, labels, norm, keep, classes)
        attack.max_iter, attack.curr_iter = iterations, done
        with _numpy_seeded(seed, stage):
            reached: Any = attack.generate(
                x=as_numpy(u[owners]),
                y=labels[owners].cpu().numpy(),
                x_adv_init=as_numpy(current),
                resume=done > 0,
            )
        current = torch.from_numpy(np.asarray(reached, dtype=np.float32)).to(device)
        done += iterations
    if owners:
        owners, current = _nearest(owners, current, u, labels, norm, 1, classes)
        points[owners] = current
    refined_points, found = _onto_boundary(classes, u, labels, points, norm, budget.refine_steps)
    return HardLabelOutcome(points=refined_points, found=found)


def perturbation_size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """ℓ2 or ℓ∞ norm of every row of a batch, in float64."""
    flat = delta.flatten(1).double()
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def _nearest(
    owners: list[int],
    candidates: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor,
    norm: str,
    keep: int,
    classes: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[list[int], torch.Tensor]:
    """The `keep` nearest adversarial candidates of every input (ART returns the input itself
    where it fails: such a candidate is dropped), in the order given."""
    sizes = perturbation_size(candidates - u[owners], norm)
    sizes[classes(candidates) == labels[owners]] = torch.inf
    ranked: dict[int, list[tuple[float, int]]] = {}
    for position, row in enumerate(owners):
        if math.isfinite(float(sizes[position])):
            ranked.setdefault(row, []).append((float(sizes[position]), position))
    kept = sorted(p for pairs in ranked.values() for _, p in sorted(pairs)[:keep])
    return [owners[p] for p in kept], candidates[kept]


def _starting_points(
    classes: Callable[[torch.Tensor], torch.Tensor],
    u: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    budget: HopSkipJumpBudget,
) -> tuple[list[int], torch.Tensor]:
    """HopSkipJump's starting points, up to `starts` per input, of distinct predicted
    classes: the other inputs of the batch first (`labels` are the model's classes of `u`),
    then uniform random points of the box drawn from `seed` that the model classifies
    otherwise (at most init_size per input, 10 at a time in one batch). Returns the input row of
    every start and the starts."""
    rng = np.random.default_rng(seed)
    chosen: list[dict[int, torch.Tensor]] = [{} for _ in range(len(u))]
    for row in range(len(u)):
        for other in range(len(u)):
            label = int(labels[other])
            fresh = label != int(labels[row]) and label not in chosen[row]
            if fresh and len(chosen[row]) < budget.starts:
                chosen[row][label] = u[other]
    per_round = 10
    for _ in range(0, budget.init_size, per_round):
        rows = [row for row in range(len(u)) if len(chosen[row]) < budget.starts]
        if not rows:
            break
        draws = rng.uniform(0.0, 1.0, size=(len(rows), per_round, *u.shape[1:]))
        candidates = torch.from_numpy(draws.astype(np.float32)).to(u.device)
        predicted = classes(candidates.flatten(0, 1)).view(len(rows), per_round).tolist()
        for position, row in enumerate(rows):
            for draw, label in enumerate(predicted[position]):
                fresh = label != int(labels[row]) and label not in chosen[row]
                if fresh and len(chosen[row]) < budget.starts:
                    chosen[row][label] = candidates[position, draw]
    owners = [row for row in range(len(u)) for _ in chosen[row]]
    if not owners:
        return [], u[:0]
    return owners, torch.stack([start for picks in chosen for start in picks.values()])


def _onto_boundary(
    classes: Callable[[torch.Tensor], torch.Tensor],
    u: torch.Tensor,
    labels: torch.Tensor,
    points: torch.Tensor,
    norm: str,
    steps: int,
) -> tuple[torch.Tensor, list[bool]]:
    """Bisect every adversarial point towards its input (ℓ2: along the segment; ℓ∞: on the
    box of half-width a around the input, as HopSkipJump's own ℓ∞ bisection), always keeping an
    adversarial end. Returns the points and which are adversarial."""
    found = classes(points) != labels
    rows = torch.nonzero(found).flatten()
    refined = points.clone()
    if not len(rows):
        return refined, found.tolist()
    x, delta, y = u[rows], points[rows] - u[rows], labels[rows]
    if norm == "l2":
        hi = torch.ones(len(rows), dtype=u.dtype, device=u.device)
    else:
        hi = delta.flatten(1).abs().amax(dim=1)
    lo = torch.zeros_like(hi)

    def at(scale: torch.Tensor) -> torch.Tensor:
        view = scale.view(-1, *([1] * (u.dim() - 1)))
        if norm == "l2":
            return x + view * delta
        return x + torch.maximum(torch.minimum(delta, view), -view)

    for _ in range(steps):
        mid = (lo + hi) / 2
        fooled = classes(at(mid)) != y
        hi = torch.where(fooled, mid, hi)
        lo = torch.where(fooled, lo, mid)
    refined[rows] = at(hi)
    return refined, found.tolist()
