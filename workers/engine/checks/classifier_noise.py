"""`random_noise` on a classifier: accuracy under Gaussian noise, per relative level δ.

Each sample adds e with ‖e‖₂ = δ‖x‖₂ (the same relative convention as for reconstructions, the
identity operator standing in for A; the same seeded draws), then clips x + e to the value
range. A sample fails when it is misclassified; `failure_probability` is the fraction of failed
samples with a Clopper–Pearson 95 % interval, and `flip_probability` the fraction whose
prediction differs from the clean prediction. `failure_error` (τ) plays no part here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from schemas.checks import RandomNoiseCheck
from workers.engine.checks.classifier_common import classifier_inputs
from workers.engine.context import AuditContext, Subject
from workers.engine.noise import unit_noise
from workers.engine.shards import derive_seed
from workers.engine.stats import clopper_pearson

TASK = "classification"
CHUNK = 64


def run(
    config: RandomNoiseCheck,
    ctx: AuditContext,
    subject: Subject,
    indices: Sequence[int],
    seed: int,
) -> dict[str, Any]:
    """Per image and level: samples, misclassified samples, flipped predictions."""
    classifier, _, labels = classifier_inputs(ctx, subject, indices, "random_noise")
    lo, hi = classifier.value_range
    per_image = []
    with torch.no_grad():
        for row, index in enumerate(indices):
            x = ctx.images[index : index + 1]
            clean = int(classifier.predict(x)[0])
            x_norm = x.flatten(1).norm(dim=1)
            levels = []
            for level in config.levels:
                wrong = flipped = 0
                for start in range(0, config.samples, CHUNK):
                    samples = range(start, min(start + CHUNK, config.samples))
                    seeds = [derive_seed(seed, index, level, s) for s in samples]
                    e = unit_noise(ctx, x.shape[1:], seeds, x_norm, level)
                    predicted = classifier.predict((x + e).clamp(lo, hi))
                    wrong += int((predicted != labels[row]).sum())
                    flipped += int((predicted != clean).sum())
                levels.append({"level": level, "wrong": wrong, "flipped": flipped})
            per_image.append(
                {
                    "index": int(index),
                    "clean_correct": clean == int(labels[row]),
                    "levels": levels,
                }
            )
    return {"task": TASK, "images": per_image}


def merge(config: RandomNoiseCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
    images = [image for shard in shards for image in shard["images"]]
    table = []
    for position, level in enumerate(config.levels):
        rows = [image["levels"][position] for image in images]
        trials = config.samples * len(images)
        wrong = sum(row["wrong"] for row in rows)
        flipped = sum(row["flipped"] for row in rows)
        low, high = clopper_pearson(wrong, trials)
        flip_low, flip_high = clopper_pearson(flipped, trials)
        table.append(
            {
                "level": level,
                "accuracy": 1.0 - wrong / trials,
                "failure_probability": {"estimate": wrong / trials, "ci_low": low, "ci_high": high},
                "flip_probability": {
                    "estimate": flipped / trials,
                    "ci_low": flip_low,
                    "ci_high": flip_high,
                },
                "failures": wrong,
                "trials": trials,
            }
        )
    result: dict[str, Any] = {
        "task": TASK,
        "samples_per_image": config.samples,
        "images": len(images),
        "clean_accuracy": sum(image["clean_correct"] for image in images) / len(images),
        "levels": table,
        "warnings": [],
    }
    return result  # random_noise.merge adds the threshold's comparison and the verdict
