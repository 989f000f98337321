"""`minimal_perturbation`: the smallest adversarial perturbation of every input (an ensemble of
adv-lib's FMN, DDN and DeepFool, scaled to each input and refined to the decision boundary: the
smallest verified point, and the attack that found it), its distribution, and the
accuracy-vs-ε curve it implies.

A misclassified input has minimal norm 0. Where no attack of the chain finds an adversarial
point the norm is null: it counts as +∞ in the quantiles and as robust at every ε in the curve,
so both are upper bounds (an attack only ever over-estimates the minimal norm).

A query-only model (an endpoint model: no gradients) is searched by the hard-label attack
HopSkipJump instead (workers.engine.hard_label, its default budget; `attack` and `steps` do not
apply): the result says so (`attack: "hopskipjump"`, `query_only: true`), and its norms are
upper bounds in the same sense.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from schemas.checks_classifier import MinimalPerturbationCheck
from schemas.verdicts import compare, judge
from workers.engine.checks.classifier_common import classifier_inputs
from workers.engine.classifier_attacks import (
    BATCH_IMAGES,
    is_adversarial,
    minimal_adversarial,
    minimal_chain,
    perturbation_norm,
    seeded,
)
from workers.engine.classifiers import ClassifierSubject
from workers.engine.context import AuditContext, Subject
from workers.engine.endpoint_model import is_query_only, query_scope
from workers.engine.hard_label import ATTACK as HARD_LABEL_ATTACK
from workers.engine.hard_label import DEFAULT_BUDGET, hop_skip_jump

_SUMMARY = ("median", "q10", "q90", "min", "max")


class MinimalPerturbation:
    kind = "minimal_perturbation"

    def run(
        self,
        config: MinimalPerturbationCheck,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]:
        classifier, u, labels = classifier_inputs(ctx, subject, indices, self.kind)
        model = classifier.box_model
        if is_query_only(model.model):
            return _run_query_only(config, classifier, u, labels, indices, seed)
        correct = classifier.predict(classifier.from_unit(u)) == labels
        norms: list[float | None] = [None if bool(c) else 0.0 for c in correct]
        found_by: list[str | None] = [None] * len(u)
        attacked = [row for row in range(len(u)) if bool(correct[row])]
        with seeded(seed, u.device):
            for start in range(0, len(attacked), BATCH_IMAGES):
                rows = attacked[start : start + BATCH_IMAGES]
                outcome = minimal_adversarial(
                    model, u[rows], labels[rows], config.threat_model(), config.search_settings()
                )
                sizes = perturbation_norm(outcome.points - u[rows], config.norm) * classifier.scale
                # the model re-run on every point kept (x + δ in the value range): verified
                fooled = is_adversarial(model, outcome.points, labels[rows]).tolist()
                for position, row in enumerate(rows):
                    if outcome.found_by[position] is not None and fooled[position]:
                        norms[row] = float(sizes[position])
                        found_by[row] = outcome.found_by[position]
        images = [
            {
                "index": int(index),
                "label": int(labels[row]),
                "norm": norms[row],
                "found_by": found_by[row],
            }
            for row, index in enumerate(indices)
        ]
        return {"images": images}

    def merge(
        self, config: MinimalPerturbationCheck, shards: list[dict[str, Any]]
    ) -> dict[str, Any]:
        images = [image for shard in shards for image in shard["images"]]
        found = [image["norm"] for image in images if image["norm"] is not None]
        not_found = len(images) - len(found)
        # not found: +∞, an upper bound like every norm an attack finds
        every = sorted([*found, *([math.inf] * not_found)])
        summary = _summary(every)
        grid = config.epsilons or sorted({n for n in found if n > 0})
        curve = [
            {
                "epsilon": eps,
                # robust at ε: correctly classified and no adversarial point within ε found
                "accuracy": sum(1 for i in images if i["norm"] is None or i["norm"] > eps)
                / len(images),
            }
            for eps in grid
        ]
        query_only = any(shard.get("query_only") for shard in shards)
        chain = [HARD_LABEL_ATTACK] if query_only else minimal_chain(config.attack, config.norm)
        budget = (
            f"queries only, {DEFAULT_BUDGET.max_iter} iterations"
            if query_only
            else f"{config.steps} steps each"
        )
        warnings = []
        if not_found:
            warnings.append(
                f"{not_found} input(s): no adversarial point found by {', '.join(chain)} "
                f"({budget}); their norm is null, +∞ in the quantiles and "
                "robust in the curve (upper bounds)"
            )
        if images and summary["median"] is None:
            verdict = (
                f"; verdict {config.threshold.unmeasured_median} (threshold.unmeasured_median)"
                if config.threshold is not None
                else ""
            )
            warnings.append(
                "more than half of the inputs have no adversarial point found: the median is "
                "+∞, not a measurement; a failed search is no evidence of robustness ("
                + (
                    "HopSkipJump at its fixed budget, by queries alone"
                    if query_only
                    else "raise steps, look for gradient masking"
                )
                + f"){verdict}"
            )
        if query_only and {"attack", "steps"} & config.model_fields_set:
            warnings.append(
                "attack and steps choose the white-box attacks: a query-only model is searched "
                "by HopSkipJump with its own budget (hopskipjump)"
            )
        counts = Counter(image.get("found_by") for image in images if image["norm"])
        result: dict[str, Any] = {
            "norm": config.norm,
            "attack": HARD_LABEL_ATTACK if query_only else config.attack,
            "attacks": chain,
            "images": len(images),
            "clean_accuracy": (
                sum(1 for i in images if i["norm"] != 0.0) / len(images) if images else None
            ),
            "norms": summary,
            "norms_found": _summary(sorted(found)),
            "not_found": not_found,
            "found_by": {name: counts[name] for name in chain if counts[name]},
            "per_image": [
                {"index": i["index"], "norm": i["norm"], "found_by": i.get("found_by")}
                for i in images
            ],
            "accuracy_curve": curve,
            "warnings": warnings,
        }
        if query_only:
            result["query_only"] = True
            # hard-label queries find adversarial points: every norm bounds the minimal one from
            # above (the minimal one may be smaller), as every attack's does
            result["norms_bound"] = "upper"
            result["hopskipjump"] = DEFAULT_BUDGET.settings()
        return judge(result, _comparisons(config, summary["median"], bool(images)))


def _run_query_only(
    config: MinimalPerturbationCheck,
    classifier: ClassifierSubject,
    u: torch.Tensor,
    labels: torch.Tensor,
    indices: Sequence[int],
    seed: int,
) -> dict[str, Any]:
    """HopSkipJump on the predicted classes alone (workers.engine.hard_label): every query goes
    through the unit-box model under no_grad, charged to the check."""
    model = classifier.box_model
    with query_scope(model.model, MinimalPerturbation.kind):
        correct = classifier.predict(classifier.from_unit(u)) == labels
        norms: list[float | None] = [None if bool(c) else 0.0 for c in correct]
        found_by: list[str | None] = [None] * len(u)
        attacked = [row for row in range(len(u)) if bool(correct[row])]
        for start in range(0, len(attacked), BATCH_IMAGES):
            rows = attacked[start : start + BATCH_IMAGES]
            outcome = hop_skip_jump(
                model,
                u[rows],
                labels[rows],
                config.norm,
                classifier.num_classes,
                seed=seed + start,
                budget=DEFAULT_BUDGET,
            )
            sizes = perturbation_norm(outcome.points - u[rows], config.norm) * classifier.scale
            fooled = is_adversarial(model, outcome.points, labels[rows]).tolist()
            for position, row in enumerate(rows):
                if outcome.found[position] and fooled[position]:
                    norms[row] = float(sizes[position])
                    found_by[row] = HARD_LABEL_ATTACK
    images = [
        {
            "index": int(index),
            "label": int(labels[row]),
            "norm": norms[row],
            "found_by": found_by[row],
        }
        for row, index in enumerate(indices)
    ]
    return {"images": images, "query_only": True}


def quantile(ascending: Sequence[float], q: float) -> float:
    """numpy's default quantile (linear between order statistics) on values that may be +∞:
    where the upper neighbour is +∞ the lower one is taken, so the q-quantile is +∞ only when
    +∞ fills its lower position (the median: when more than half of the values are +∞)."""
    position = q * (len(ascending) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ascending) - 1)
    fraction = position - low
    a, b = ascending[low], ascending[high]
    if fraction == 0 or math.isinf(b):
        return a
    return a + (b - a) * fraction


def _summary(ascending: Sequence[float]) -> dict[str, float | None]:
    """median, 10 % and 90 % quantiles, min and max; +∞ (and no values at all) as null."""
    if not ascending:
        return dict.fromkeys(_SUMMARY)
    values = {
        "median": quantile(ascending, 0.5),
        "q10": quantile(ascending, 0.1),
        "q90": quantile(ascending, 0.9),
        "min": ascending[0],
        "max": ascending[-1],
    }
    return {key: None if math.isinf(value) else float(value) for key, value in values.items()}


def _comparisons(
    config: MinimalPerturbationCheck, median: float | None, measured: bool
) -> list[dict[str, Any]]:
    """The median against its lower bound. A median of +∞ (more than half not found) is not a
    measurement: it fails unless the threshold says `unmeasured_median: "pass"` (fail closed)."""
    if config.threshold is None or not measured:
        return []
    bound = config.threshold.min_median_norm
    if median is None:
        return [
            compare(
                "median minimal perturbation norm (+∞: most inputs have none found)",
                None,
                bound,
                "at_least",
                passed=config.threshold.unmeasured_median == "pass",
            )
        ]
    return [compare("median minimal perturbation norm", median, bound, "at_least")]
