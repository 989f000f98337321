"""Attacks on classifiers, by the reference libraries, on the unit box (see classifiers.py).

- `autoattack`: pyautoattack's AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square),
  unchanged for ten or more classes. With fewer classes the targeted attacks get
  `num_classes − 1` target classes (the standard version assumes 10 and would index past the
  logits); below 4 classes the targeted DLR loss is undefined, so APGD-CE, FAB and Square run
  untargeted. Its sanity checks (gradient masking, randomness, probabilities instead of
  logits) are returned as warnings.
- `apgd`: adv-lib's APGD with the cross-entropy loss; `pgd`: adv-lib's ℓ∞ PGD, and a plain
  ℓ2 PGD here (adv-lib has none). Restarts and all epsilons share one batch (a per-sample ε
  is part of adv-lib's API).
- minimal perturbations: adv-lib's FMN, DDN and DeepFool with their schedules set from a first
  estimate of each input's distance (not the constants tuned for images filling [0, 1]), every
  point found refined to the decision boundary by bisection, and the next attack tried where
  one finds nothing (`minimal_adversarial`).
- `square`: for a model that answers queries only (an endpoint model, `query_only`), AutoAttack's
  own score-based Square attack (pyautoattack.square) with the standard version's settings,
  forward passes only (`run_square`); under ℓ2 first the finite-difference Jacobian attack of
  workers/engine/jacobian_attack.py, Square on what it leaves of the budget (`run_query_only`).

Inputs and outputs are unit-box tensors; callers convert ε and norms with the subject's scale.
As the worst-case search (attacks.py), an attack takes its threat model (`NormBall`: the norm
and the ε of every row; the norm alone for the minimum-norm attacks) apart from its search
settings (the API's AdversarialSearch and MinimalPerturbationSearch: attack, steps).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from adv_lib.attacks import apgd, ddn, df, fmn, pgd_linf
from pyautoattack import AutoAttack
from pyautoattack.square import SquareAttack

from schemas.checks_classifier import (
    AdversarialSearch,
    MinimalPerturbationSearch,
    MinimalPerturbationThreatModel,
)
from workers.engine.classifiers import UnitBoxClassifier
from workers.engine.jacobian_attack import jacobians_within, run_jacobian_l2
from workers.shared.errors import EngineInputError

# Images per attack call: restarts × epsilons × images make one batch.
BATCH_IMAGES = 64
_P = {"linf": float("inf"), "l2": 2.0}
_AA_NORM = {"linf": "Linf", "l2": "L2"}
_AA_STANDARD_TARGETS = 9
# Slack on an attack's projection before a point counts as outside its ball (float32).
_NORM_SLACK = 1e-5


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """ℓ∞ or ℓ2 norm of each sample of a batch: shape [B]."""
    return torch.linalg.vector_norm(delta.flatten(1), ord=_P[norm], dim=1)


def is_adversarial(model: UnitBoxClassifier, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(u).argmax(dim=1) != labels


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The libraries draw from torch's global generators: seed them, restore them afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed % 2**63)
        yield


@dataclass
class AutoAttackOutcome:
    broken: torch.Tensor  # [B] bool: misclassified after the attack (clean errors included)
    broken_by: dict[int, str]  # row → the first attack that broke it (not for clean errors)
    warnings: list[str] = field(default_factory=list)


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _collect_autoattack_warnings() -> Iterator[list[str]]:
    logger = logging.getLogger("auto-attack")
    collector = _WarningCollector()
    propagate = logger.propagate
    logger.addHandler(collector)
    logger.propagate = False  # they go into the report, not onto the runner's stderr
    try:
        yield collector.messages
    finally:
        logger.removeHandler(collector)
        logger.propagate = propagate


def build_autoattack(
    model: UnitBoxClassifier, norm: str, eps: float, seed: int, device: torch.device
) -> tuple[AutoAttack, list[str]]:
    """The standard AutoAttack, adapted to the number of classes as the module doc says."""
    classes = model.num_classes
    notes: list[str] = []
    if classes >= 4:
        attack = AutoAttack(
            model, norm=_AA_NORM[norm], eps=eps, seed=seed, device=device, version="standard"
        )
        targets = min(_AA_STANDARD_TARGETS, classes - 1)
        attack.apgd_targeted.n_target_classes = targets
        attack.fab.n_target_classes = targets
        if targets < _AA_STANDARD_TARGETS:
            notes.append(f"AutoAttack standard: {targets} target classes ({classes} classes)")
    else:
        attack = AutoAttack(
            model,
            norm=_AA_NORM[norm],
            eps=eps,
            seed=seed,
            device=device,
            version="custom",
            attacks=["apgd-ce", "fab", "square"],
        )
        attack.apgd.n_restarts = 1
        attack.fab.n_restarts = 1
        notes.append(
            f"AutoAttack with {classes} classes: the targeted DLR attacks need 4 or more; ran "
            "APGD-CE, FAB and Square untargeted"
        )
    attack.logger.setLevel(logging.WARNING)  # its per-batch debug lines are not wanted
    return attack, notes


def run_autoattack(
    model: UnitBoxClassifier,
    u: torch.Tensor,
    labels: torch.Tensor,
    norm: str,
    eps: float,
    seed: int,
) -> AutoAttackOutcome:
    """AutoAttack at one ε (unit box) on a batch; which attack broke every row."""
    attack, notes = build_autoattack(model, norm, eps, seed, u.device)
    broken_by: dict[int, str] = {}
    _record_successes(attack, model, u, broken_by)
    with _collect_autoattack_warnings() as messages:
        adversarial, _ = attack.run_standard_evaluation(u, labels, batch_size=max(1, len(u)))
    broken = is_adversarial(model, adversarial, labels)
    return AutoAttackOutcome(
        broken=broken,
        broken_by=broken_by,
        warnings=[*notes, *(f"AutoAttack: {m}" for m in dict.fromkeys(messages))],
    )


def _record_successes(
    attack: AutoAttack, model: UnitBoxClassifier, u: torch.Tensor, broken_by: dict[int, str]
) -> None:
    """Wrap every sub-attack's `perturb` to note the rows it breaks. AutoAttack hands each
    sub-attack the rows still robust, as copies: they are found again by their bytes."""
    rows: dict[bytes, list[int]] = {}
    for index, row in enumerate(u.detach().cpu()):
        rows.setdefault(row.numpy().tobytes(), []).append(index)

    def wrap(target: object, name: Callable[[], str]) -> None:
        original = target.perturb  # type: ignore[attr-defined]

        def perturb(x: torch.Tensor, y: torch.Tensor, *args: object, **kwargs: object) -> object:
            adversarial = original(x, y, *args, **kwargs)
            fooled = is_adversarial(model, adversarial, y).cpu().tolist()
            for row, hit in zip(x.detach().cpu(), fooled, strict=True):
                for index in rows.get(row.numpy().tobytes(), []) if hit else []:
                    broken_by.setdefault(index, name())
            return adversarial

        target.perturb = perturb  # type: ignore[attr-defined]

    wrap(attack.apgd, lambda: f"apgd-{attack.apgd.loss}")
    wrap(attack.apgd_targeted, lambda: "apgd-t")
    wrap(attack.fab, lambda: "fab-t" if attack.fab.targeted else "fab")
    wrap(attack.square, lambda: "square")


# The query-only attack: AutoAttack's Square as its standard version runs it (pyautoattack
# AutoAttack.__init__ and _set_version("standard")): at most 5000 queries per image and restart,
# squares of p_init = 0.8 of the image at first on the fixed (not rescaled) schedule, one
# restart, the margin loss, untargeted.
SQUARE_QUERIES = 5000
SQUARE_P_INIT = 0.8
# Square's ℓ2 start tiles the image with squares of side h // 5: at least this many rows and
# columns (smaller images are padded, `_square_l2_shape`).
_SQUARE_L2_MIN_SIDE = 5


class _Square(SquareAttack):
    """pyautoattack's SquareAttack with one fix: it draws a window's corner from
    `random_int(0, h − s)`, which is [0, h − s) (as the reference implementation's
    np.random.randint), so once windows are smaller than the image the last row and column
    are never in one again; here the corner is drawn from [0, h − s]. The corners are its only
    use of `random_int` in an untargeted attack given labels. On 8×8 linear classifiers (ε the
    median distance) the library's draw left up to 5 of 9 breakable images robust under ℓ∞,
    at exact distances of 0.63 ε to 0.96 ε; with the fix every one was found."""

    def random_int(
        self, low: int = 0, high: int = 1, shape: list[int] | None = None
    ) -> torch.Tensor:
        draw = torch.rand(shape or [1]).to(self.device)
        return (low + (high - low + 1) * draw).long().clamp(max=high)


class _Cropped(torch.nn.Module):
    """The model on the top left height × width of a padded image."""

    def __init__(self, model: torch.nn.Module, height: int, width: int) -> None:
        super().__init__()
        self.model, self.height, self.width = model, height, width

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(u[..., : self.height, : self.width])


def _square_l2_start_fits(height: int, width: int) -> bool:
    """Whether Square's ℓ2 start fits an image: pyautoattack tiles it with squares of side
    s = height // 5 from ((height − 5s) // 2, the same) on, height // s rows by width // s
    columns of them, and fails on a square the border cuts (s > 1)."""
    side = height // 5
    if side == 0 or min(height, width) < _SQUARE_L2_MIN_SIDE:
        return False
    if side == 1:
        return True
    first = (height - 5 * side) // 2
    spans = [(first + i * side, height) for i in range(height // side)]
    spans += [(first + j * side, width) for j in range(width // side)]
    return all(min(start + side, size) - start == side for start, size in spans)


def _square_l2_shape(height: int, width: int) -> tuple[int, int]:
    """The image size Square's ℓ2 runs on: the image's own where its start fits (28×28, 32×32,
    64×64, 224×224 among them), else the smallest size padded at the bottom and right that
    fits (12×12, 14×14, 24×24 and images under 5 pixels: the library fails on them). The
    padding cannot change the model's answer, but Square's ℓ2 budget covers it too, so on
    padded images it spends part of its ε there until its moves take the mass back."""
    if _square_l2_start_fits(height, width):
        return height, width
    for total in range(height + width, 4 * (height + width) + 20):
        for rows in range(max(height, _SQUARE_L2_MIN_SIDE), total + 1):
            columns = total - rows
            if columns >= width and _square_l2_start_fits(rows, columns):
                return rows, columns
    raise EngineInputError(f"no padding of {height}×{width} fits Square's ℓ2 start")  # unreachable


@dataclass
class SquareOutcome:
    broken: torch.Tensor  # [B] bool: a verified adversarial point inside the ball was found
    outside: int  # adversarial points outside the ball (not counted)


def run_square(
    model: UnitBoxClassifier,
    u: torch.Tensor,
    labels: torch.Tensor,
    norm: str,
    eps: float,
    seed: int,
    queries: int | None = None,
) -> SquareOutcome:
    """AutoAttack's Square (score-based, forward passes only) at one ε (unit box) on a batch of
    correctly classified images: SQUARE_QUERIES (or `queries`) iterations at most, each one
    query per image not yet broken, plus one per image to check the start, one for its first
    point and one for its last; the points it reports are verified (one more query per moved
    image) and must lie in the ball. ℓ2 on image sizes pyautoattack's Square cannot start on
    runs on the image padded (`_square_l2_shape`). Every call of the model is made under
    torch.no_grad on inputs that do not require a gradient. Seeded: Square seeds torch's
    global generator itself, which is restored afterwards."""
    height, width = u.shape[-2:]
    padded = _square_l2_shape(height, width) if norm == "l2" else (height, width)
    x = u.detach()
    start = x
    if padded != (height, width):
        # the padding is cut off before the model sees a point, and off the point returned
        start = torch.nn.functional.pad(x, (0, padded[1] - width, 0, padded[0] - height), value=0.5)
    attack = _Square(
        _Cropped(model, height, width),
        norm=_AA_NORM[norm],
        n_queries=SQUARE_QUERIES if queries is None else queries,
        eps=eps,
        p_init=SQUARE_P_INIT,
        n_restarts=1,
        seed=seed % 2**63,
        verbose=False,
        device=u.device,
        resc_schedule=False,
    )
    with seeded(seed, u.device), torch.no_grad():
        adversarial = attack.perturb(start, labels)[..., :height, :width]
        moved = (adversarial != x).flatten(1).any(dim=1)
        fooled = torch.zeros_like(moved)
        if bool(moved.any()):
            fooled[moved] = is_adversarial(model, adversarial[moved], labels[moved])
    inside = perturbation_norm(adversarial - x, norm) <= eps * (1 + _NORM_SLACK)
    return SquareOutcome(broken=fooled & inside, outside=int((fooled & ~inside).sum()))


# Square's queries per image beyond its iterations: the start's check, its first and last point,
# and the verification of the point it reports (`run_square`).
_SQUARE_OVERHEAD = 4


@dataclass
class QueryOnlyOutcome:
    broken: torch.Tensor  # [B] bool: a verified adversarial point inside the ball was found
    broken_by: list[str | None]  # per row: "jacobian" or "square" (None: not broken)
    outside: int  # Square's adversarial points outside the ball (not counted)
    attacks: list[str]  # the attacks that ran, in order
    jacobians: int  # the Jacobian attack's iterations per image (0: it did not run)


def run_query_only(
    model: UnitBoxClassifier,
    u: torch.Tensor,
    labels: torch.Tensor,
    norm: str,
    eps: float,
    seed: int,
) -> QueryOnlyOutcome:
    """The query-only attack at one ε (unit box) on a batch of correctly classified images, at
    most SQUARE_QUERIES + 4 queries per image. ℓ∞: Square (`run_square`), as AutoAttack runs it.
    ℓ2: the finite-difference Jacobian attack (jacobian_attack.run_jacobian_l2) with as many
    iterations as `jacobians_within` allows, then Square on the images it did not break with the
    queries left (SQUARE_QUERIES + 4 in all per image, Square's overhead included); Square
    alone where the input is too large for two Jacobians within the budget."""
    broken_by: list[str | None] = [None] * len(u)
    budget = SQUARE_QUERIES + _SQUARE_OVERHEAD
    jacobians = 0
    if norm == "l2":
        jacobians = jacobians_within(u[0].numel(), int(model.num_classes), budget)
    if not jacobians:
        outcome = run_square(model, u, labels, norm, eps, seed)
        for row in outcome.broken.nonzero().flatten().tolist():
            broken_by[row] = "square"
        return QueryOnlyOutcome(outcome.broken, broken_by, outcome.outside, ["square"], 0)
    first = run_jacobian_l2(model, u, labels, eps, jacobians)
    broken = first.broken.clone()
    for row in broken.nonzero().flatten().tolist():
        broken_by[row] = "jacobian"
    rows = (~broken).nonzero().flatten()
    left = budget - int(first.spent[rows.cpu()].max()) - _SQUARE_OVERHEAD if len(rows) else 0
    outside = 0
    if len(rows) and left > 0:
        second = run_square(model, u[rows], labels[rows], norm, eps, seed, queries=left)
        outside = second.outside
        for position, row in enumerate(rows.tolist()):
            if bool(second.broken[position]):
                broken[row] = True
                broken_by[row] = "square"
    return QueryOnlyOutcome(broken, broken_by, outside, ["jacobian", "square"], jacobians)


@dataclass(frozen=True)
class NormBall:
    """The threat model of one batch on the unit box: ‖δ‖ ≤ eps[row] in `norm`, u + δ in the
    box; the attacker succeeds when the predicted class changes."""

    norm: str  # "linf" or "l2"
    eps: torch.Tensor  # [B], unit-box units


def run_ball_attack(
    model: UnitBoxClassifier,
    u: torch.Tensor,
    labels: torch.Tensor,
    threat: NormBall,
    search: AdversarialSearch,
) -> torch.Tensor:
    """One adv-lib APGD or PGD run (`search.attack`, `search.steps`) per row with its own ε
    (levels are rows; so are the restarts, which the caller lays out)."""
    norm, eps, attack, steps = threat.norm, threat.eps, search.attack, search.steps
    if attack == "apgd":
        return apgd(
            model, u, labels, eps=eps, norm=_P[norm], n_iter=steps, loss_function="ce"
        ).detach()
    if norm == "linf":
        return pgd_linf(
            model, u, labels, ε=eps, steps=steps, relative_step_size=2.5 / steps
        ).detach()
    return pgd_l2(model, u, labels, eps, steps)


def pgd_l2(
    model: UnitBoxClassifier, u: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor, steps: int
) -> torch.Tensor:
    """ℓ2 PGD (Madry et al.) on the cross-entropy: random start in the ball, steps of 2.5ε/steps
    along the normalised gradient, projection onto the ball and the box; the first adversarial
    point found is kept."""
    view = (-1, *([1] * (u.dim() - 1)))
    radius = eps.view(view)
    start = torch.randn_like(u)
    start = start / perturbation_norm(start, "l2").clamp_min(1e-12).view(view)
    delta = start * radius * torch.rand(u.shape[0], device=u.device).view(view)
    best = u.clone()
    found = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
    step = 2.5 * radius / steps
    for _ in range(steps):
        delta = ((u + delta).clamp(0.0, 1.0) - u).requires_grad_(True)
        logits = model(u + delta)
        fooled = logits.argmax(dim=1) != labels
        best = torch.where((fooled & ~found).view(view), (u + delta).detach(), best)
        found |= fooled
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, delta)
        direction = gradient / perturbation_norm(gradient, "l2").clamp_min(1e-12).view(view)
        delta = delta.detach() + step * direction
        shrink = (radius / perturbation_norm(delta, "l2").clamp_min(1e-12).view(view)).clamp(max=1)
        delta = delta * shrink
    final = (u + delta).clamp(0.0, 1.0).detach()
    return torch.where(found.view(view), best, final)


# Minimum-norm attacks. The libraries' schedules are constants tuned for images that fill the unit
# box (DDN's first norm 1, FMN's first step 1, DeepFool's 1e-4 added to every distance): they are
# set here from a first estimate of each input's distance instead, so that the norms found do
# not depend on how wide the model's value range is.

MINIMAL_ATTACKS = ("fmn", "ddn", "deepfool")
# `to_boundary`: halvings of the segment from the input to a found point (a bracket of 2^-16 of
# its length), then a step past the bracket's adversarial end by this fraction of its distance,
# so that the point stays adversarial when rounded differently. The norm kept is at most about
# 1.2e-4 (relative) past the boundary crossing the bracket holds.
BISECTION_STEPS = 16
BOUNDARY_MARGIN = 1e-4
# The ensemble keeps a later run's point only where it is smaller than the point kept so far by
# more than this (relative): twice the refinement's tolerance, so that two runs that reached the
# same boundary count as a tie, credited to the earlier run (the configured attack first).
TIE = 2.5e-4
# DeepFool's relative overshoot past the linearised boundary (adv-lib's default).
DEEPFOOL_OVERSHOOT = 0.02
# adv-lib's DeepFool adds this to every linearised distance (unit-box units).
_DEEPFOOL_ADDED = 1e-4
# FMN's first step, in units of the ℓ2 length of its start (or of the estimate); it decays to
# 1/100 of that, as in adv-lib (whose α_init = 1 is a few times the typical norm on [0, 1]
# images). 0.3 and 30 gave the same median on the reference classifier, means 0.3 % and 2 %
# higher.
FMN_STEP = 3.0
# DDN's cross-entropy sees the logits divided by a temperature per input that sets the clean
# margin (true logit minus the largest other) to this: the arbitrary scale of the logits then
# plays no part. Larger margins make the float32 gradient vanish at the clean input (a random
# direction instead); much smaller ones blend every class's direction into the gradient, and DDN
# settles 10-25 % above the nearest boundary of a linear 4-class model. 3 to 30 measured alike.
DDN_MARGIN = 10.0
# The linearised estimates run over every class; the gradients of the logit differences come
# from copies of the batch, at most this many input values at a time.
_JACOBIAN_ELEMENTS = 2**22
# Inputs whose estimates lie within this ratio share one library call (adv-lib takes init_norm,
# α_init and overshoot as one number per call).
_GROUP_RATIO = 2.0**0.5
# Smallest estimate kept: about the float32 resolution of the unit box.
_SMALLEST = 1e-7


@dataclass
class MinimalOutcome:
    points: torch.Tensor  # [B, ...]: the adversarial point kept, the input where none was found
    found_by: list[str | None]  # the attack that found it, per row


def minimal_chain(first: str, norm: str) -> list[str]:
    """The attacks tried in turn on the inputs still without an adversarial point: FMN → DDN →
    DeepFool, cyclically from the configured one; DDN minimises ℓ2 only."""
    start = MINIMAL_ATTACKS.index(first)
    order = MINIMAL_ATTACKS[start:] + MINIMAL_ATTACKS[:start]
    return [name for name in order if norm == "l2" or name != "ddn"]


def minimal_adversarial(
    model: UnitBoxClassifier,
    u: torch.Tensor,
    labels: torch.Tensor,
    threat: MinimalPerturbationThreatModel,
    search: MinimalPerturbationSearch,
) -> MinimalOutcome:
    """An ensemble of adv-lib's minimum-norm attacks in `threat.norm`, `search.steps` iterations
    each, scaled to each input: `search.attack` and DeepFool over every class (`walk`, batched
    gradients; credited as `deepfool`) on every input, for `ddn` also DDN targeted at the class
    of the nearest linearised boundary where that is not the runner-up; the rest of
    `minimal_chain` in turn for the inputs where none of these found anything. Every point
    found is refined to the decision boundary along its direction (`to_boundary`) and verified
    (the model re-run on the point, clipped to the box: the class changed); per input the
    smallest verified point is kept, and the attack that found it (a later run replaces a point
    only where it is smaller by more than TIE: ties go to the first run)."""
    norm, attack = threat.norm, search.attack
    problem = _Problem(model, u, labels, norm, search.steps)
    chain = minimal_chain(attack, norm)
    every = torch.arange(len(u), device=u.device)
    best = torch.full((len(u),), float("inf"), device=u.device)
    points = u.clone()
    found_by: list[str | None] = [None] * len(u)
    ran: set[str] = set()

    def offer(name: str, rows: torch.Tensor, found: torch.Tensor) -> None:
        """Refine, verify and keep the points of one run that beat the best so far."""
        # the libraries return the input where they found nothing; a point they found may lie
        # within float rounding of the boundary, where another batch may round it back
        moved = (found != u[rows]).flatten(1).any(dim=1)
        rows, found = rows[moved], found[moved]
        if not len(rows):
            return
        refined = to_boundary(model, u[rows], found, labels[rows]).clamp(0.0, 1.0)
        verified = is_adversarial(model, refined, labels[rows])
        size = perturbation_norm(refined - u[rows], norm)
        # a later run wins where it is smaller beyond the refinement's resolution (TIE)
        better = verified & (size < best[rows] * (1 - TIE))
        for position in better.nonzero().flatten().tolist():
            row = int(rows[position])
            points[row] = refined[position]
            best[row] = size[position]
            found_by[row] = name

    offer(attack, every, problem.attack(attack, every))
    ran.add(attack)
    offer("deepfool", every, problem.walk(every))
    if attack == "ddn":
        aside = (problem.nearest != problem.runner_up).nonzero().flatten()
        if len(aside):
            offer("ddn", aside, problem.ddn(aside, targets=problem.nearest[aside]))
    for name in chain:
        rows = torch.tensor(
            [row for row, by in enumerate(found_by) if by is None],
            device=u.device,
            dtype=torch.long,
        )
        if not len(rows):
            break
        if name not in ran:
            offer(name, rows, problem.attack(name, rows))
            ran.add(name)
    return MinimalOutcome(points=points, found_by=found_by)


def to_boundary(
    model: UnitBoxClassifier,
    u: torch.Tensor,
    adversarial: torch.Tensor,
    labels: torch.Tensor,
    steps: int = BISECTION_STEPS,
) -> torch.Tensor:
    """Bisection on the segment u → adversarial (t from 0 to 1): `steps` halvings bracket a
    boundary crossing in [low, high]; the point kept is at t = high·(1 + BOUNDARY_MARGIN)
    (clipped to the box), past the boundary by a margin that float rounding in another batch
    does not undo (an attack's own point may sit on the boundary itself). Where that point does
    not evaluate adversarial here: the point at `high`, else the given point."""
    view = (-1, *([1] * (u.dim() - 1)))
    direction = adversarial - u
    low = torch.zeros(len(u), device=u.device)
    high = torch.ones(len(u), device=u.device)
    best = adversarial.clone()

    def point(t: torch.Tensor) -> torch.Tensor:
        return (u + t.view(view) * direction).clamp(0.0, 1.0)

    for _ in range(steps):
        middle = (low + high) / 2
        candidate = point(middle)
        fooled = is_adversarial(model, candidate, labels)
        best = torch.where(fooled.view(view), candidate, best)
        high = torch.where(fooled, middle, high)
        low = torch.where(fooled, low, middle)
    beyond = point(high * (1 + BOUNDARY_MARGIN))
    kept = is_adversarial(model, beyond, labels)
    return torch.where(kept.view(view), beyond, best)


class _Tempered(torch.nn.Module):
    """Logits divided by a temperature per row: the same predicted classes. Used by DDN, whose
    rows keep their order through the attack."""

    def __init__(self, model: UnitBoxClassifier, temperature: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", temperature.view(-1, 1))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(u) / self.temperature


class _Problem:
    """One batch of inputs and the first estimate of their distances, shared by the attacks."""

    def __init__(
        self,
        model: UnitBoxClassifier,
        u: torch.Tensor,
        labels: torch.Tensor,
        norm: str,
        steps: int,
    ) -> None:
        self.model, self.u, self.labels, self.norm, self.steps = model, u, labels, norm, steps
        self.step, self.margin, self.nearest = linearised_step(model, u, labels, norm)
        with torch.no_grad():
            others = model(u).scatter(1, labels[:, None], float("-inf"))
        self.runner_up = others.argmax(dim=1)
        self._walk_points = u.clone()
        self._walked = torch.zeros(len(u), dtype=torch.bool, device=u.device)
        # the farthest point of the box bounds every distance (and stands in where the gradient
        # vanishes and the estimate is infinite)
        far = torch.maximum(u, 1.0 - u)
        self.distance = _bounded(perturbation_norm(self.step, norm), perturbation_norm(far, norm))
        self.length = _bounded(perturbation_norm(self.step, "l2"), perturbation_norm(far, "l2"))

    def attack(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        if name == "fmn":
            return self.fmn(rows)
        if name == "ddn":
            return self.ddn(rows)
        return self.deepfool(rows)

    def deepfool(self, rows: torch.Tensor) -> torch.Tensor:
        """adv-lib's DeepFool. It adds 1e-4 (unit box) to every linearised distance, which
        dominates where distances are that small (a wide value range); the overshoot o is set
        so that the first step overshoots the estimated distance d₀ by DEEPFOOL_OVERSHOOT:
        (1 + o)(d₀ + 1e-4) = (1 + 0.02) d₀ (o ≈ 0.02 where d₀ ≫ 1e-4)."""
        u, labels = self.u[rows], self.labels[rows]
        out = u.clone()
        for sub, d0 in _groups(self.distance[rows]):
            out[sub] = df(
                self.model,
                u[sub],
                labels[sub],
                steps=self.steps,
                norm=_P[self.norm],
                overshoot=(1 + DEEPFOOL_OVERSHOOT) * d0 / (d0 + _DEEPFOOL_ADDED) - 1,
            ).detach()
        return out

    def walk(self, rows: torch.Tensor) -> torch.Tensor:
        """DeepFool over every class with the batched gradients of `linearised_step` (adv-lib's
        DeepFool takes one backward pass per class and step), at most `steps` steps, until the
        point is adversarial; the input where it never is. Each linearised distance d gets
        DEEPFOOL_OVERSHOOT × the first one, d₀, added (adv-lib adds 1e-4 instead), so that steps
        near the boundary still cross it, and the sum is overshot by DEEPFOOL_OVERSHOOT:
        (d + 0.02 d₀)(1 + 0.02). Deterministic: computed once per row (FMN's warm start and the
        ensemble's DeepFool candidate share it)."""
        todo_rows = rows[~self._walked[rows]]
        if len(todo_rows):
            self._walk_points[todo_rows] = self._walk(todo_rows)
            self._walked[todo_rows] = True
        return self._walk_points[rows]

    def _walk(self, rows: torch.Tensor) -> torch.Tensor:
        view = (-1, *([1] * (self.u.dim() - 1)))
        labels, first = self.labels[rows], self.distance[rows]

        def stretched(step: torch.Tensor, todo: torch.Tensor) -> torch.Tensor:
            d = perturbation_norm(step, self.norm).clamp_min(_SMALLEST)
            factor = (1 + DEEPFOOL_OVERSHOOT) * (1 + DEEPFOOL_OVERSHOOT * first[todo] / d)
            return step * factor.view(view)

        todo = torch.arange(len(rows), device=rows.device)
        point = (self.u[rows] + stretched(self.step[rows], todo)).clamp(0.0, 1.0)
        out = self.u[rows].clone()
        for iteration in range(self.steps):
            fooled = is_adversarial(self.model, point[todo], labels[todo])
            out[todo[fooled]] = point[todo[fooled]]
            todo = todo[~fooled]
            if not len(todo) or iteration + 1 == self.steps:
                break
            step, _, _ = linearised_step(self.model, point[todo], labels[todo], self.norm)
            point[todo] = (point[todo] + stretched(step, todo)).clamp(0.0, 1.0)
        return out

    def fmn(self, rows: torch.Tensor) -> torch.Tensor:
        """FMN twice, the smaller adversarial point kept: from the point of `walk` where it
        found one (FMN alone approaches the boundary from inside and, on a nearly linear model,
        may never cross it), and from the input (started from `walk` alone it settled higher on
        some digits of the reference classifier). First step FMN_STEP × the ℓ2 length of the
        start (of the estimate from the input); γ, the relative change of FMN's norm bound, is
        scale-free and left as is."""
        u = self.u[rows]
        out = self._fmn(rows, self.length[rows], None)
        start = self.walk(rows)
        warm = (start != u).flatten(1).any(dim=1).nonzero().flatten()
        if not len(warm):
            return out
        length = perturbation_norm(start[warm] - u[warm], "l2").clamp_min(_SMALLEST)
        other = self._fmn(rows[warm], length, start[warm])
        cold = out[warm]
        # FMN returns the input where it found nothing (norm 0): that one never wins
        size = perturbation_norm(cold - u[warm], self.norm)
        better = (size == 0) | (perturbation_norm(other - u[warm], self.norm) < size)
        out[warm[better]] = other[better]
        return out

    def _fmn(
        self, rows: torch.Tensor, length: torch.Tensor, start: torch.Tensor | None
    ) -> torch.Tensor:
        """adv-lib's FMN on `rows`, first step FMN_STEP × `length`, from `start` if given."""
        u, labels = self.u[rows], self.labels[rows]
        out = u.clone()
        for sub, scale in _groups(length):
            run = partial(
                fmn,
                self.model,
                u[sub],
                labels[sub],
                norm=_P[self.norm],
                steps=self.steps,
                α_init=FMN_STEP * scale,
            )
            if start is None:
                out[sub] = run().detach()
                continue
            try:
                out[sub] = run(starting_points=start[sub]).detach()
            except ValueError:  # a start on the boundary that rounds the other way here
                out[sub] = run().detach()
        return out

    def ddn(self, rows: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """DDN (no 8-bit quantisation, which would move the norm) with its first norm the
        estimated distance, on logits tempered to a clean margin of DDN_MARGIN; with `targets`,
        DDN targeted at those classes (adversarial for the untargeted problem too)."""
        u, labels = self.u[rows], self.labels[rows]
        out = u.clone()
        temperature = self.margin[rows].clamp_min(1e-6) / DDN_MARGIN
        for sub, init_norm in _groups(self.distance[rows]):
            out[sub] = ddn(
                _Tempered(self.model, temperature[sub]),
                u[sub],
                labels[sub] if targets is None else targets[sub],
                targeted=targets is not None,
                steps=self.steps,
                init_norm=init_norm,
                levels=None,
            ).detach()
        return out


def linearised_step(
    model: UnitBoxClassifier, u: torch.Tensor, labels: torch.Tensor, norm: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepFool's first step without overshoot over EVERY class: the perturbation to the nearest
    boundary of the model linearised at u, d = min over k ≠ y of |z_y − z_k| / ‖∇(z_y − z_k)‖_*
    (‖·‖₂ for ℓ2, ‖·‖₁ for ℓ∞); the clean margin (true logit minus the largest other; negative
    when misclassified); and the class k of that nearest linearised boundary. The step is zero
    (and the class the runner-up) where no gradient flows.

    Every class, not the runners-up by logit: the nearest boundary can belong to the class with
    the lowest logit (a large gap over a small ‖∇(z_y − z_k)‖). The gradients of all K − 1 logit
    differences come from copies of the batch, in chunks of at most _JACOBIAN_ELEMENTS input
    values: K − 1 forward and backward passes per input, batched (counted as such)."""
    view = (-1, *([1] * (u.dim() - 1)))
    batch = len(u)
    with torch.no_grad():
        logits = model(u)
    classes = logits.shape[1]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    runner_up = others.argmax(dim=1)
    margin = logits.gather(1, labels[:, None])[:, 0] - others.max(dim=1).values
    best = torch.full((batch,), float("inf"), device=u.device)
    nearest = runner_up.clone()
    step = torch.zeros_like(u)
    candidates = torch.arange(classes, device=u.device)
    chunk = max(1, min(classes, _JACOBIAN_ELEMENTS // max(1, u[0].numel() * batch)))
    rows = torch.arange(batch, device=u.device)
    for first in range(0, classes, chunk):
        ks = candidates[first : first + chunk]  # [C]
        x = u.repeat(len(ks), *([1] * (u.dim() - 1))).requires_grad_(True)  # [C·B, ...]
        out = model(x).view(len(ks), batch, classes)
        true = out.gather(2, labels.view(1, batch, 1).expand(len(ks), batch, 1))
        other = out.gather(2, ks.view(-1, 1, 1).expand(len(ks), batch, 1))
        gaps = (true - other)[..., 0]  # [C, B]: z_y − z_k at copy k
        (gradient,) = torch.autograd.grad(gaps.sum(), x)
        gradient = gradient.view(len(ks), *u.shape).detach()
        flat = gradient.flatten(2)
        dual = torch.linalg.vector_norm(flat, ord=1 if norm == "linf" else 2, dim=2)  # [C, B]
        distance = gaps.detach().abs() / dual  # inf where the gradient vanishes (nan: k = y)
        distance = torch.where(ks[:, None] == labels[None, :], float("inf"), distance)
        distance = torch.nan_to_num(distance, nan=float("inf"))
        value, position = distance.min(dim=0)  # [B]
        closer = value < best
        if not bool(closer.any()):
            continue
        g = gradient[position, rows]  # [B, ...]: the nearest class of this chunk
        # towards the other class: down the gradient of (true − other)
        if norm == "linf":
            candidate = -g.sign() * value.view(view)
        else:
            candidate = -g * (value / dual[position, rows]).view(view)
        best = torch.where(closer, value, best)
        nearest = torch.where(closer, ks[position], nearest)
        step = torch.where(closer.view(view), candidate, step)
    step = torch.where(torch.isfinite(best).view(view), step, torch.zeros_like(step))
    return torch.nan_to_num(step.detach()), margin.detach(), nearest


def _bounded(estimate: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    estimate = torch.where(estimate > 0, estimate, far)  # no gradient: the box is the only scale
    return torch.minimum(estimate, far).clamp_min(_SMALLEST)


def _groups(scale: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """Rows whose scales lie within _GROUP_RATIO of each other, with their geometric mean."""
    logs = torch.log(scale)
    keys = torch.floor(logs / math.log(_GROUP_RATIO))
    groups = []
    for key in torch.unique(keys):
        rows = (keys == key).nonzero().flatten()
        groups.append((rows, float(torch.exp(logs[rows].mean()))))
    return groups
