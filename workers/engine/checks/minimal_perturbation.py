"""`minimal_perturbation`: the smallest adversarial perturbation of every input (adv-lib's FMN,
DDN or DeepFool), its distribution, and the accuracy-vs-ε curve it implies.

A misclassified input has minimal norm 0. Where the attack finds no adversarial point the norm
is null: the curve counts such inputs as robust at every ε, so it is an upper bound on the
robust accuracy (an attack only ever over-estimates the minimal norm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from schemas.checks_classifier import MinimalPerturbationCheck
from workers.engine.checks.classifier_common import classifier_inputs
from workers.engine.classifier_attacks import (
    BATCH_IMAGES,
    is_adversarial,
    minimal_adversarial,
    perturbation_norm,
    seeded,
)
from workers.engine.context import AuditContext, Subject


class MinimalPerturbationRunner:
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
        correct = classifier.predict(classifier.from_unit(u)) == labels
        norms: list[float | None] = [None if bool(c) else 0.0 for c in correct]
        attacked = [row for row in range(len(u)) if bool(correct[row])]
        with seeded(seed, u.device):
            for start in range(0, len(attacked), BATCH_IMAGES):
                rows = attacked[start : start + BATCH_IMAGES]
                found = minimal_adversarial(
                    model, u[rows], labels[rows], config.norm, config.attack, config.steps
                )
                fooled = is_adversarial(model, found, labels[rows])
                sizes = perturbation_norm(found - u[rows], config.norm) * classifier.scale
                for position, row in enumerate(rows):
                    if bool(fooled[position]):
                        norms[row] = float(sizes[position])
        images = [
            {"index": int(index), "label": int(labels[row]), "norm": norms[row]}
            for row, index in enumerate(indices)
        ]
        return {"images": images}

    def merge(
        self, config: MinimalPerturbationCheck, shards: list[dict[str, Any]]
    ) -> dict[str, Any]:
        images = [image for shard in shards for image in shard["images"]]
        found = [image["norm"] for image in images if image["norm"] is not None]
        not_found = len(images) - len(found)
        summary = (
            {
                "median": float(np.median(found)),
                "q10": float(np.quantile(found, 0.1)),
                "q90": float(np.quantile(found, 0.9)),
                "min": min(found),
                "max": max(found),
            }
            if found
            else {"median": None, "q10": None, "q90": None, "min": None, "max": None}
        )
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
        warnings = []
        if not_found:
            warnings.append(
                f"{not_found} input(s): no adversarial point found in {config.steps} steps; "
                "their norm is null and the curve counts them as robust (an upper bound)"
            )
        result: dict[str, Any] = {
            "norm": config.norm,
            "attack": config.attack,
            "images": len(images),
            "clean_accuracy": sum(1 for i in images if i["norm"] != 0.0) / len(images),
            "norms": summary,
            "not_found": not_found,
            "per_image": [{"index": i["index"], "norm": i["norm"]} for i in images],
            "accuracy_curve": curve,
            "warnings": warnings,
        }
        result["verdict"] = _verdict(config, summary["median"])
        return result


def _verdict(config: MinimalPerturbationCheck, median: float | None) -> str:
    if config.threshold is None:
        return "info"
    if median is None:  # nothing found: no evidence of instability within the steps run
        return "pass"
    return "pass" if median >= config.threshold.min_median_norm else "fail"
