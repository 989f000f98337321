"""`adversarial`: robust accuracy of a classifier against a norm-bounded attacker, per ε.

An image counts as robust at ε when it is classified correctly and the attack finds no
misclassified point within ‖δ‖ ≤ ε (inside the value range). The balls are nested, so an
image broken at ε stays broken at every larger ε; the larger levels only attack the images
still robust. Each shard returns per-image facts; `merge` builds the per-level table.

A model that answers queries only (an endpoint model: `query_only`, no gradients) is attacked by
queries instead of the configured attack (classifier_attacks.run_query_only), its queries charged
to ("adversarial", ε): under ℓ∞ AutoAttack's score-based Square; under ℓ2 first linearised steps
on finite-difference Jacobians of the logits (workers.engine.jacobian_attack), then Square with
the queries left. The result says so (`attack`: square or jacobian, `attacks`, `query_only`:
true, `jacobian` with its settings where it ran).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from schemas.checks_classifier import AdversarialCheck
from schemas.verdicts import compare, fmt, judge
from workers.engine.checks.classifier_common import classifier_inputs
from workers.engine.classifier_attacks import (
    BATCH_IMAGES,
    SQUARE_P_INIT,
    SQUARE_QUERIES,
    NormBall,
    is_adversarial,
    perturbation_norm,
    run_autoattack,
    run_ball_attack,
    run_query_only,
    seeded,
)
from workers.engine.classifiers import ClassifierSubject
from workers.engine.context import AuditContext, Subject
from workers.engine.endpoint_model import is_query_only, query_scope
from workers.engine.jacobian_attack import CANDIDATES, FD_STEP, OVERSHOOT
from workers.engine.stats import clopper_pearson

# Slack on the library's projection before a point counts as outside the ball (float32).
_NORM_SLACK = 1e-5


class Adversarial:
    kind = "adversarial"

    def run(
        self,
        config: AdversarialCheck,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]:
        classifier, u, labels = classifier_inputs(ctx, subject, indices, self.kind)
        query_only = is_query_only(classifier.box_model.model)
        with query_scope(classifier.box_model.model, self.kind):
            correct = classifier.predict(classifier.from_unit(u)) == labels
        broken_at: list[float | None] = [None] * len(indices)
        broken_by: list[str | None] = [None] * len(indices)
        levels = _autoattack_levels if config.attack == "autoattack" else _ball_levels
        ran: dict[str, int] = {}
        if query_only:
            levels = partial(_query_only_levels, ran=ran)
        warnings = levels(config, classifier, u, labels, correct, seed, broken_at, broken_by)
        images = [
            {
                "index": int(index),
                "label": int(labels[row]),
                "clean_correct": bool(correct[row]),
                "broken_at": broken_at[row],
                "broken_by": broken_by[row],
            }
            for row, index in enumerate(indices)
        ]
        if query_only:
            return {
                "images": images,
                "warnings": warnings,
                "query_only": True,
                "attacks": list(ran) or ["square"],
                "jacobians": ran.get("jacobian", 0),
            }
        return {"images": images, "warnings": warnings}

    def merge(self, config: AdversarialCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
        images = [image for shard in shards for image in shard["images"]]
        total = len(images)
        clean = sum(image["clean_correct"] for image in images)
        levels = []
        for eps in config.epsilons:
            broken = [
                image
                for image in images
                if image["broken_at"] is not None and image["broken_at"] <= eps
            ]
            robust = clean - len(broken)
            low, high = clopper_pearson(robust, total)
            levels.append(
                {
                    "epsilon": eps,
                    "robust_accuracy": robust / total,
                    "robust_accuracy_ci": {"low": low, "high": high},
                    "robust": robust,
                    "images": total,
                    "broken_by": dict(sorted(Counter(i["broken_by"] for i in broken).items())),
                }
            )
        warnings = list(dict.fromkeys(w for shard in shards for w in shard.get("warnings", [])))
        result: dict[str, Any] = {
            "norm": config.norm,
            "attack": config.attack,
            "clean_accuracy": clean / total,
            "images": total,
            "levels": levels,
            "per_image": images,
            "warnings": warnings,
        }
        if any(shard.get("query_only") for shard in shards):
            attacks = [
                name
                for name in ("jacobian", "square")
                if any(name in shard.get("attacks", ["square"]) for shard in shards)
            ]
            result["attack"] = attacks[0]
            result["attacks"] = attacks
            result["query_only"] = True
            result["square"] = {"queries_per_image": SQUARE_QUERIES, "p_init": SQUARE_P_INIT}
            if "jacobian" in attacks:
                result["jacobian"] = {
                    "jacobians": max(shard.get("jacobians", 0) for shard in shards),
                    "fd_step": FD_STEP,
                    "candidates": CANDIDATES,
                    "overshoot": OVERSHOOT,
                    "queries_per_image": SQUARE_QUERIES + 4,
                }
            if {"attack", "steps", "restarts"} & config.model_fields_set:
                warnings.append(
                    "attack, steps and restarts choose the white-box attack: a query-only model "
                    f"is attacked by queries with its own budget ({', '.join(attacks)})"
                )
        return judge(result, _comparisons(config, levels))


def _comparisons(config: AdversarialCheck, levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if config.threshold is None:
        return []
    at = config.threshold.at_epsilon or config.epsilons[-1]
    row = next(level for level in levels if level["epsilon"] == at)
    bound = config.threshold.min_robust_accuracy
    return [compare(f"robust accuracy at ε = {fmt(at)}", row["robust_accuracy"], bound, "at_least")]


def _autoattack_levels(
    config: AdversarialCheck,
    classifier: ClassifierSubject,
    u: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    seed: int,
    broken_at: list[float | None],
    broken_by: list[str | None],
) -> list[str]:
    warnings: list[str] = []
    for eps in config.epsilons:
        rows = [row for row in range(len(u)) if bool(correct[row]) and broken_at[row] is None]
        if not rows:
            break
        outcome = run_autoattack(
            classifier.box_model, u[rows], labels[rows], config.norm, eps / classifier.scale, seed
        )
        warnings.extend(outcome.warnings)
        for position, row in enumerate(rows):
            if bool(outcome.broken[position]):
                broken_at[row] = eps
                broken_by[row] = outcome.broken_by.get(position, "autoattack")
    return list(dict.fromkeys(warnings))


def _query_only_levels(
    config: AdversarialCheck,
    classifier: ClassifierSubject,
    u: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    seed: int,
    broken_at: list[float | None],
    broken_by: list[str | None],
    ran: dict[str, int],
) -> list[str]:
    """Query-only: `run_query_only` at each ε on the images still robust, its queries charged
    to ("adversarial", ε); `ran` gets the attacks that ran (the Jacobian attack's iterations
    per image as the value)."""
    model = classifier.box_model
    outside = 0
    for eps in config.epsilons:
        rows = [row for row in range(len(u)) if bool(correct[row]) and broken_at[row] is None]
        if not rows:
            break
        with query_scope(model.model, "adversarial", eps):
            outcome = run_query_only(
                model, u[rows], labels[rows], config.norm, eps / classifier.scale, seed
            )
        outside += outcome.outside
        for name in outcome.attacks:
            ran[name] = max(ran.get(name, 0), outcome.jacobians if name == "jacobian" else 0)
        for position, row in enumerate(rows):
            if bool(outcome.broken[position]):
                broken_at[row] = eps
                broken_by[row] = outcome.broken_by[position]
    if outside:
        return [
            f"{outside} adversarial point(s) of the square attack lay outside their ε-ball and "
            "were not counted"
        ]
    return []


def _ball_levels(
    config: AdversarialCheck,
    classifier: ClassifierSubject,
    u: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    seed: int,
    broken_at: list[float | None],
    broken_by: list[str | None],
) -> list[str]:
    """APGD / PGD: every (ε, restart, image) is one row of one batch."""
    model = classifier.box_model
    search = config.search_settings()
    epsilons = config.epsilons
    copies = len(epsilons) * search.restarts
    attacked = [row for row in range(len(u)) if bool(correct[row])]
    outside = 0
    with seeded(seed, u.device):
        for start in range(0, len(attacked), BATCH_IMAGES):
            rows = attacked[start : start + BATCH_IMAGES]
            x = u[rows].repeat(copies, *([1] * (u.dim() - 1)))
            y = labels[rows].repeat(copies)
            radius = torch.tensor(
                [eps / classifier.scale for eps in epsilons for _ in range(search.restarts)],
                device=u.device,
                dtype=u.dtype,
            ).repeat_interleave(len(rows))
            adversarial = run_ball_attack(model, x, y, NormBall(config.norm, radius), search)
            inside = perturbation_norm(adversarial - x, config.norm) <= radius * (1 + _NORM_SLACK)
            fooled = is_adversarial(model, adversarial, y)
            outside += int((fooled & ~inside).sum())
            fooled = (fooled & inside).view(len(epsilons), search.restarts, len(rows)).any(dim=1)
            for position, row in enumerate(rows):
                hits = [eps for eps, hit in zip(epsilons, fooled[:, position], strict=True) if hit]
                if hits:  # nested balls: the smallest ε that broke it
                    broken_at[row] = hits[0]
                    broken_by[row] = config.attack
    if outside:
        return [
            f"{outside} adversarial point(s) of the {config.attack} attack lay outside their "
            "ε-ball and were not counted"
        ]
    return []
