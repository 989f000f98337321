"""`random_noise`: random measurement noise at relative levels δ; the distribution of the
error and the probability that it exceeds τ (the universal instability theorem, part (b)).

The noise is uniform on the sphere of radius δ‖y‖ over the measured entries: an isotropic
Gaussian draw on those entries, normalised to norm exactly δ‖y‖ (workers.engine.noise). The failure
probability's Clopper–Pearson interval is over images × samples of the audited images: it
describes the noise on these images, not a population of images.

A shard returns, per image and level, running sums of every metric over the samples (so shards
of any size merge exactly); `merge` turns them into the per-level table of docs/reports.md.

Forward passes only (under `torch.no_grad()`): an endpoint model runs it unchanged, each level's
queries charged to (random_noise, level), the clean reconstructions to (random_noise, None)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from schemas.checks import RandomNoiseCheck
from schemas.verdicts import compare, fmt, judge
from workers.engine import metrics
from workers.engine.checks import classifier_noise
from workers.engine.classifiers import ClassifierSubject
from workers.engine.context import AuditContext, Subject
from workers.engine.endpoint_model import query_scope
from workers.engine.noise import unit_noise
from workers.engine.shards import derive_seed
from workers.engine.stats import clopper_pearson

# Noisy copies reconstructed in one batch.
CHUNK = 32
METRICS = ("relative_error", "psnr", "ssim", "amplification", "lipschitz_lower_bound")
REPORTED = {
    "relative_error": ("mean", "std", "max"),
    "psnr": ("mean", "min"),
    "ssim": ("mean", "min"),
    "amplification": ("mean", "max"),
    "lipschitz_lower_bound": ("mean", "max"),
}
# What the report says was drawn and what its interval is about (fields `distribution`,
# `interval_scope`): a reader of report.json alone must not have to read this code.
DISTRIBUTION = (
    "uniform on the sphere of radius δ‖y‖ over the measured entries (an isotropic Gaussian "
    "on the measured entries, both parts of complex k-space alike, scaled to norm exactly δ‖y‖; "
    "y the audited measurement, ‖·‖ over measured entries), one independent seeded draw per "
    "image, level and sample"
)
CLASSIFIER_DISTRIBUTION = (
    "uniform on the sphere of radius δ‖x‖ over every input entry (an isotropic Gaussian scaled "
    "to norm exactly δ‖x‖, in the model's input units), then x + e clipped to the value range; "
    "one independent seeded draw per image, level and sample"
)
INTERVAL_SCOPE = (
    "The failure probability is counted over images × samples of the audited images, the "
    "images fixed and the noise random: its Clopper–Pearson interval is for the mean failure "
    "probability over these images, not for a population of images (those outside the audit)"
)

# What the check measures for a stochastic model (the result's `sampler.measures`).
SAMPLER_MEASURES = (
    "single draws of the sampler: every reconstruction of a noisy measurement is a call of its "
    "own on that one measurement (batch 1), drawing anew, so every perturbation gets an "
    "independent draw even from a model that draws once per call; the failure probability and "
    "its interval are over both the perturbation and the sampler's draws; amplification and "
    "lipschitz_lower_bound compare two draws (the clean reconstruction is one draw too) and "
    "count the sampler's spread as change, which the noise floor (model.noise_floor) measures "
    "on its own"
)


class RandomNoise:
    kind = "random_noise"

    def run(
        self,
        config: RandomNoiseCheck,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]:
        if isinstance(subject, ClassifierSubject):  # accuracy per level instead of errors
            return classifier_noise.run(config, ctx, subject, indices, seed)
        operator = ctx.operator
        complex_images = ctx.images.shape[1] == 2 and operator.kind == "mri"
        per_image = []
        # a sampler: one call per measurement, so each perturbation (and each image's clean
        # reconstruction) gets a draw of its own whatever the model draws per call
        reconstruct = _one_call_each if subject.stochastic else _batched_call
        with torch.no_grad():
            y_all = ctx.measurements(indices)
            clean_all = reconstruct(subject, y_all)
            for row, index in enumerate(indices):
                y, x, clean = (
                    y_all[row : row + 1],
                    ctx.images[index : index + 1],
                    clean_all[row : row + 1],
                )
                y_norm = operator.norm(y)
                clean_norm = clean.flatten(1).norm(dim=1).clamp_min(1e-12)
                levels = []
                for level in config.levels:
                    values: dict[str, list[float]] = {name: [] for name in METRICS}
                    for start in range(0, config.samples, CHUNK):
                        samples = range(start, min(start + CHUNK, config.samples))
                        seeds = [derive_seed(seed, index, level, s) for s in samples]
                        e = unit_noise(ctx, y.shape[1:], seeds, y_norm, level)
                        with query_scope(subject.network, "random_noise", level):
                            out = reconstruct(subject, y + e)
                        target = x.expand_as(out)
                        change = (out - clean).flatten(1).norm(dim=1)
                        e_norm = operator.norm(e)
                        batch = {
                            "relative_error": metrics.relative_error(out, target),
                            "psnr": metrics.psnr(out, target, ctx.value_range, complex_images),
                            "ssim": metrics.ssim(out, target, ctx.value_range, complex_images),
                            "amplification": (change / clean_norm) / (e_norm / y_norm),
                            "lipschitz_lower_bound": change / e_norm,
                        }
                        for name, tensor in batch.items():
                            values[name].extend(tensor.double().cpu().tolist())
                    levels.append(_level_sums(level, values, config.failure_error))
                per_image.append(
                    {
                        "index": int(index),
                        "clean_relative_error": float(metrics.relative_error(clean, x)[0]),
                        "levels": levels,
                    }
                )
        if subject.stochastic:
            return {"images": per_image, "sampler": {}}
        return {"images": per_image}

    def merge(self, config: RandomNoiseCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
        if shards and shards[0].get("task") == classifier_noise.TASK:
            merged = classifier_noise.merge(config, shards)
            merged["distribution"] = CLASSIFIER_DISTRIBUTION
            merged["interval_scope"] = INTERVAL_SCOPE
            comparisons, at_level = threshold_comparisons(config, merged["levels"])
            if at_level is not None:
                merged["verdict_level"] = at_level
            return judge(merged, comparisons)
        images = [image for shard in shards for image in shard["images"]]
        warnings: list[str] = []
        table = []
        for position, level in enumerate(config.levels):
            rows = [(image["index"], image["levels"][position]) for image in images]
            table.append(_merge_level(level, rows))
            if any(row["non_finite"] for _, row in rows):
                warnings.append(
                    f"level {level}: the model returned NaN or infinite values; those samples "
                    "count as failures and are left out of the statistics"
                )
        clean = [image["clean_relative_error"] for image in images]
        result: dict[str, Any] = {
            "failure_error": config.failure_error,
            "distribution": DISTRIBUTION,
            "interval_scope": INTERVAL_SCOPE,
            "samples_per_image": config.samples,
            "images": len(images),
            "clean_relative_error": {
                "mean": math.fsum(clean) / len(clean),
                "max": max(clean),
            },
            "levels": table,
        }
        comparisons, at_level = threshold_comparisons(config, table)
        judge(result, comparisons)
        if at_level is not None:
            result["verdict_level"] = at_level
        if shards and shards[0].get("sampler") is not None:
            result["sampler"] = {**shards[0]["sampler"], "measures": SAMPLER_MEASURES}
        result["warnings"] = warnings
        return result


def _batched_call(subject: Subject, y: torch.Tensor) -> torch.Tensor:
    return subject.reconstruct(y)


def _one_call_each(subject: Subject, y: torch.Tensor) -> torch.Tensor:
    """A sampler's reconstructions, one call per row: independent draws per row."""
    return torch.cat([subject.reconstruct(y[row : row + 1]) for row in range(y.shape[0])])


def _level_sums(level: float, values: dict[str, list[float]], tau: float) -> dict[str, Any]:
    """Sums that merge exactly across shards: n, Σv, Σv², min, max per metric (finite samples)."""
    finite = [
        all(math.isfinite(values[name][i]) for name in METRICS)
        for i in range(len(values["relative_error"]))
    ]
    sums: dict[str, Any] = {"level": level, "non_finite": finite.count(False)}
    sums["failures"] = sum(
        1 for i, ok in enumerate(finite) if not ok or values["relative_error"][i] > tau
    )
    sums["trials"] = len(finite)
    for name in METRICS:
        kept = [v for v, ok in zip(values[name], finite, strict=True) if ok]
        sums[name] = {
            "n": len(kept),
            "sum": math.fsum(kept),
            "sumsq": math.fsum(v * v for v in kept),
            "min": min(kept) if kept else None,
            "max": max(kept) if kept else None,
        }
    return sums


def _merge_level(level: float, rows: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    failures = sum(row["failures"] for _, row in rows)
    trials = sum(row["trials"] for _, row in rows)
    low, high = clopper_pearson(failures, trials)
    merged: dict[str, Any] = {"level": level}
    for name in METRICS:
        parts = [row[name] for _, row in rows if row[name]["n"] > 0]
        n = sum(p["n"] for p in parts)
        stats: dict[str, float | None]
        if n == 0:
            stats = {field: None for field in REPORTED[name]}
        else:
            mean = math.fsum(p["sum"] for p in parts) / n
            variance = max(0.0, math.fsum(p["sumsq"] for p in parts) / n - mean * mean)
            every = {
                "mean": mean,
                "std": math.sqrt(variance),
                "min": min(p["min"] for p in parts),
                "max": max(p["max"] for p in parts),
            }
            stats = {field: every[field] for field in REPORTED[name]}
        merged[name] = stats
    merged["failure_probability"] = {"estimate": failures / trials, "ci_low": low, "ci_high": high}
    merged["failures"] = failures
    merged["trials"] = trials
    worst = max(
        (
            (index, row["relative_error"]["max"])
            for index, row in rows
            if row["relative_error"]["n"]
        ),
        key=lambda pair: pair[1],
        default=None,
    )
    merged["worst_image"] = (
        None if worst is None else {"index": worst[0], "relative_error": worst[1]}
    )
    return merged


def threshold_comparisons(
    config: RandomNoiseCheck, table: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], float | None]:
    """The failure probability's upper 95 % bound at the threshold's level against its bound,
    and that level (None without a threshold). Reconstruction and classifier tables alike."""
    if config.threshold is None:
        return [], None
    at_level = config.threshold.at_level or config.levels[-1]
    row = next(row for row in table if row["level"] == at_level)
    comparison = compare(
        f"failure probability (upper 95 % bound) at level {fmt(at_level)}",
        row["failure_probability"]["ci_high"],
        config.threshold.max_failure_probability,
    )
    return [comparison], at_level
