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
- minimal perturbations: adv-lib's FMN, DDN and DeepFool.

Inputs and outputs are unit-box tensors; callers convert ε and norms with the subject's scale.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from adv_lib.attacks import apgd, ddn, df, fmn, pgd_linf
from pyautoattack import AutoAttack

from workers.engine.classifiers import UnitBoxClassifier

# Images per attack call: restarts × epsilons × images make one batch.
BATCH_IMAGES = 64
_P = {"linf": float("inf"), "l2": 2.0}
_AA_NORM = {"linf": "Linf", "l2": "L2"}
_AA_STANDARD_TARGETS = 9


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


def run_ball_attack(
    model: UnitBoxClassifier,
    u: torch.Tensor,
    labels: torch.Tensor,
    norm: str,
    eps: torch.Tensor,
    attack: str,
    steps: int,
) -> torch.Tensor:
    """One adv-lib APGD or PGD run per row with its own ε (restarts and levels are rows)."""
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


def minimal_adversarial(
    model: UnitBoxClassifier,
    u: torch.Tensor,
    labels: torch.Tensor,
    norm: str,
    attack: str,
    steps: int,
) -> torch.Tensor:
    """adv-lib's minimum-norm attacks: the adversarial points found (the input where none)."""
    if attack == "fmn":
        return fmn(model, u, labels, norm=_P[norm], steps=steps).detach()
    if attack == "ddn":
        # levels=None: no quantisation to 8-bit images, which would move the found norm
        return ddn(model, u, labels, steps=steps, levels=None).detach()
    return df(model, u, labels, steps=steps, norm=_P[norm]).detach()
