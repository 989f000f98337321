"""`worst_case`: the adversarial perturbation search over a sweep of levels δ (robust-nets'
`find_adversarial.py`, Invfool's `pertub_SGA`), reported per level.

A shard returns, per image and level, the raw values of every metric, and for each level the
shard's worst image's perturbation e and perturbed reconstruction Ψ(y+e) (base64 float32, so
shard results stay JSON); `merge` builds the per-level table of docs/reports.md, the comparisons and
the artifacts (one pair of .npy files per level: the worst image over all shards).

An endpoint model (workers.engine.endpoint_model: no gradients) is searched by the query-only
search (workers.engine.query_search) instead of the white-box one, its queries charged to
(worst_case, level); the result says so (`search: "query-only"`, `query_search`)."""

from __future__ import annotations

import base64
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from schemas.checks import WorstCaseCheck
from schemas.sampler import AveragingSettings
from schemas.verdicts import compare, fmt, judge, proven_by
from workers.engine import metrics
from workers.engine.attacks import (
    SearchSettings,
    ThreatModel,
    per_sample_norm,
    worst_case_search,
)
from workers.engine.batching import run_in_batches
from workers.engine.checks.bracket import certify_shard, merge_bracket
from workers.engine.context import ARTIFACT_FILES_KEY, AuditContext, Subject
from workers.engine.endpoint_model import is_query_only, level_scopes, query_scope
from workers.engine.noise import unit_noise
from workers.engine.query_search import QuerySearchSettings, query_worst_case_search
from workers.engine.sampling import (
    averaged_subject,
    compare_estimate,
    interval_factor,
    replicate_statistics,
    same_draws,
    summary_errors,
)
from workers.engine.shards import derive_seed

REPORTED = {
    "relative_error": ("mean", "std", "max"),
    "psnr": ("mean", "min"),
    "ssim": ("mean", "min"),
    "amplification": ("mean", "max"),
    "lipschitz_lower_bound": ("mean", "max"),
    "gaussian_relative_error": ("mean", "max"),
}
RAW = (*REPORTED, "relative_perturbation")
# What the check measures for a stochastic model (the result's `sampler.measures`).
SAMPLER_MEASURES = (
    "the average map Ψ̄(y) = EΨ(y): the search ascends an average of `draws` calls per step "
    "(the same draws at every step, a sample-average approximation of the expectation over the "
    "sampler); every figure of the perturbation found is re-evaluated on `replicates` fresh "
    "averages, Ψ̄(y), Ψ̄(y+e) and the Gaussian comparison from the same draws (common random "
    "numbers, so the sampler's noise shared by both cancels in their difference); the table "
    "holds the replicates' mean and `standard_error` the standard error of each statistic (the "
    "mean's over images, the extreme image's for max and min)"
)
# The result's `search` for an endpoint model, searched by queries alone.
QUERY_ONLY = "query-only"


def query_settings(config: WorstCaseCheck) -> QuerySearchSettings:
    """The query-only search's settings: QuerySearchSettings' defaults, with a quarter of the
    check's restarts (rounded up), so the check's default of 4 gives the query-only default of
    1 (each query-only restart costs steps × (2·directions + 2) + 1 queries per image and
    level: 13,201 by default; one restart with all of them finds more than two with half each,
    as its linear model in the guided subspace grows with the differences made at one point)."""
    return QuerySearchSettings(restarts=max(1, math.ceil(config.restarts / 4)))


def _searched_entries(config: WorstCaseCheck, ctx: AuditContext) -> int:
    """How many entries the search perturbs: the image's, or the measured ones."""
    if config.space == "image":
        return int(ctx.images[0].numel())
    measured = ctx.operator.project(torch.ones_like(ctx.operator.A(ctx.images[:1])))
    return int((measured != 0).sum())


class WorstCase:
    kind = "worst_case"

    def run(
        self,
        config: WorstCaseCheck,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]:
        warnings: list[str] = []
        batches = run_in_batches(
            lambda start, stop: _attack_images(config, ctx, subject, indices[start:stop], seed),
            total=len(indices),
            batch_size=len(indices),
            warnings=warnings,
            label="worst_case",
        )
        images = [image for batch in batches for image in batch["images"]]
        # levels every batch finished (fewer when cancelled), in the check's order
        done = set.intersection(*({w["level"] for w in batch["worst"]} for batch in batches))
        worst = [
            max(
                (w for batch in batches for w in batch["worst"] if w["level"] == level),
                key=lambda w: w["relative_error"],
            )
            for level in config.levels
            if level in done
        ]
        result: dict[str, Any] = {"images": images, "worst": worst, "warnings": warnings}
        if is_query_only(subject.network):
            settings_used = query_settings(config)
            result["query_search"] = {
                "steps": settings_used.steps,
                "restarts": settings_used.restarts,
                "directions": settings_used.directions,
                "queries_per_level": settings_used.queries_per_level(
                    _searched_entries(config, ctx)
                ),
            }
        if subject.stochastic:
            settings = config.sampler or AveragingSettings()
            result["sampler"] = {"draws": settings.draws, "replicates": settings.replicates}
        if config.certify is not None:  # the bracket's upper ends (workers.engine.checks.bracket)
            searched = [int(image["index"]) for image in images]
            result["certify"] = certify_shard(config, ctx, subject, searched, images)
        return result

    def merge(self, config: WorstCaseCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
        images = [image for shard in shards for image in shard["images"]]
        warnings = [w for shard in shards for w in shard.get("warnings", [])]
        table = []
        files: dict[str, np.ndarray] = {}
        for k, level in enumerate(config.levels):
            # levels are searched from the smallest up: a cancelled search lacks the largest
            rows = [
                (image["index"], row)
                for image in images
                for row in image["levels"]
                if row["level"] == level
            ]
            if len(rows) < len(images):
                warnings.append(f"level {level}: stopped before every image was searched")
            table.append(_merge_level(level, rows))
            candidates = [w for shard in shards for w in shard["worst"] if w["level"] == level]
            if candidates:
                worst = max(candidates, key=lambda w: w["relative_error"])
                files[f"worst_case-level{k}-perturbation.npy"] = _decode(worst["perturbation"])
                for part in ("reconstruction", "original", "clean"):
                    files[f"worst_case-level{k}-{part}.npy"] = _decode(worst[part])
        if any(row.get("non_finite", 0) for row in table):
            warnings.append("the model returned NaN or infinite values under attack")
        clean = [image["clean_relative_error"] for image in images]
        result: dict[str, Any] = {
            "space": config.space,
            "target": config.target,
            "formulation": config.formulation,
            "optimizer": config.optimizer,
            "restarts": config.restarts,
            "images": len(images),
            "clean_relative_error": {"mean": math.fsum(clean) / len(clean), "max": max(clean)},
            "levels": table,
        }
        query_search = shards[0].get("query_search") if shards else None
        if query_search is not None:  # an endpoint model: the query-only search ran
            result["search"] = QUERY_ONLY
            result["optimizer"] = "query"
            result["restarts"] = query_search["restarts"]
            result["query_search"] = query_search
        sampler = shards[0].get("sampler") if shards else None
        replicates = None if sampler is None else int(sampler["replicates"])
        comparisons = _comparisons(config, table, replicates, warnings)
        if config.certify is None:
            judge(result, comparisons)
        else:
            section, certified = merge_bracket(config, shards, images, table, comparisons, warnings)
            result["certify"] = section
            judge(result, comparisons + certified, proven_by(result))
        if sampler is not None:
            result["sampler"] = {**sampler, "measures": SAMPLER_MEASURES}
        result["warnings"] = warnings
        result[ARTIFACT_FILES_KEY] = files
        return result


def _attack_images(
    config: WorstCaseCheck,
    ctx: AuditContext,
    subject: Subject,
    indices: Sequence[int],
    seed: int,
) -> dict[str, Any]:
    """Search, then measure every level's worst perturbation for a batch of images."""
    y = ctx.measurements(indices)
    x = ctx.images[list(indices)]
    if subject.stochastic:
        return _attack_average(config, ctx, subject, indices, seed, y, x)
    outcomes = _search(config, ctx, subject, indices, seed, y, x, subject.network)
    per_level: list[dict[str, torch.Tensor]] = []
    worst: list[dict[str, Any]] = []
    with torch.no_grad():
        clean = subject.reconstruct(y)
        for outcome in outcomes:
            e = outcome.perturbation
            noise = _gaussian_like(ctx, seed, indices, outcome.level, y, e)
            with query_scope(subject.network, "worst_case", outcome.level):
                attacked = subject.reconstruct(y + e)
                gaussian = subject.reconstruct(y + noise)
            values = _figures(ctx, x, y, e, clean, attacked, gaussian)
            per_level.append(values)
            worst.append(_worst_of(outcome.level, indices, values, e, x, clean, attacked))
        clean_error = metrics.relative_error(clean, x).double().cpu().tolist()
    return {"images": _images(indices, outcomes, per_level, clean_error), "worst": worst}


def _attack_average(
    config: WorstCaseCheck,
    ctx: AuditContext,
    subject: Subject,
    indices: Sequence[int],
    seed: int,
    y: torch.Tensor,
    x: torch.Tensor,
) -> dict[str, Any]:
    """`_attack_images` for a stochastic subject: the search on its R-draw average, every
    figure re-evaluated on K fresh averages (SAMPLER_MEASURES)."""
    settings = config.sampler or AveragingSettings()
    batch_key = (int(indices[0]), len(indices))
    # the search ascends one fixed set of R draws (a deterministic objective it converges on);
    # the figures below are re-evaluated on fresh draws, so a perturbation fitted to the
    # search's draws does not inflate them
    searched = averaged_subject(
        subject, settings.draws, derive_seed(seed, batch_key, "search"), ctx.device
    )
    averaged = averaged_subject(subject, settings.draws)
    outcomes = _search(config, ctx, searched, indices, seed, y, x, subject.network)
    per_level: list[dict[str, torch.Tensor]] = []
    per_level_errors: list[dict[str, torch.Tensor]] = []
    worst: list[dict[str, Any]] = []
    with torch.no_grad():
        with same_draws(derive_seed(seed, batch_key, "clean"), ctx.device):
            clean_error = metrics.relative_error(averaged.reconstruct(y), x)
        for outcome in outcomes:
            e = outcome.perturbation
            noise = _gaussian_like(ctx, seed, indices, outcome.level, y, e)
            replicates: list[dict[str, torch.Tensor]] = []
            for replicate in range(settings.replicates):
                draw = derive_seed(seed, batch_key, outcome.level, "replicate", replicate)
                # the same draws at y, y + e and y + noise: their differences lose the noise
                outputs = []
                for shifted in (y, y + e, y + noise):
                    charged = query_scope(subject.network, "worst_case", outcome.level)
                    with same_draws(draw, ctx.device), charged:
                        outputs.append(averaged.reconstruct(shifted))
                clean, attacked, gaussian = outputs
                if replicate == 0:
                    shown_clean, shown_attacked = clean, attacked
                replicates.append(_figures(ctx, x, y, e, clean, attacked, gaussian))
            values, errors = {}, {}
            for name in RAW:
                values[name], errors[name] = replicate_statistics(
                    torch.stack([r[name].double() for r in replicates])
                )
            per_level.append(values)
            per_level_errors.append(errors)
            worst.append(
                _worst_of(outcome.level, indices, values, e, x, shown_clean, shown_attacked)
            )
    images = _images(
        indices, outcomes, per_level, clean_error.double().cpu().tolist(), per_level_errors
    )
    return {"images": images, "worst": worst}


def _search(
    config: WorstCaseCheck,
    ctx: AuditContext,
    subject: Subject,
    indices: Sequence[int],
    seed: int,
    y: torch.Tensor,
    x: torch.Tensor,
    network: Any = None,
) -> list[Any]:
    """The ascending-level search of the check's threat model, one seed per image: by queries
    alone when `network` (the audited model) is an endpoint model, each level's queries charged
    to it."""
    seeds = [derive_seed(seed, index, "worst_case") for index in indices]
    if is_query_only(network):
        with level_scopes(network, "worst_case") as on_level:
            return query_worst_case_search(
                subject,
                ctx.operator,
                y,
                x,
                ThreatModel.from_check(config.threat_model()),
                query_settings(config),
                seeds=seeds,
                should_stop=ctx.should_stop,
                on_level=on_level,
            )
    return worst_case_search(
        subject,
        ctx.operator,
        y,
        x,
        ThreatModel.from_check(config.threat_model()),
        SearchSettings.from_check(config.search_settings()),
        seeds=seeds,
        should_stop=ctx.should_stop,
    )


def _gaussian_like(
    ctx: AuditContext,
    seed: int,
    indices: Sequence[int],
    level: float,
    y: torch.Tensor,
    e: torch.Tensor,
) -> torch.Tensor:
    """A Gaussian perturbation of each found perturbation's norm: how much worse than chance
    the attack is."""
    e_norm = ctx.operator.norm(e).clamp_min(1e-30)
    gaussian_seeds = [derive_seed(seed, i, level, "gaussian") for i in indices]
    return unit_noise(ctx, y.shape[1:], gaussian_seeds, e_norm, 1.0)


def _figures(
    ctx: AuditContext,
    x: torch.Tensor,
    y: torch.Tensor,
    e: torch.Tensor,
    clean: torch.Tensor,
    attacked: torch.Tensor,
    gaussian: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Every RAW figure per image: reconstructions of y, y + e and y + Gaussian noise."""
    operator = ctx.operator
    complex_images = ctx.images.shape[1] == 2 and operator.kind == "mri"
    e_norm = operator.norm(e).clamp_min(1e-30)
    y_norm = operator.norm(y)
    change = per_sample_norm(attacked - clean)
    clean_norm = per_sample_norm(clean).clamp_min(1e-12)
    return {
        "relative_error": metrics.relative_error(attacked, x),
        "psnr": metrics.psnr(attacked, x, ctx.value_range, complex_images),
        "ssim": metrics.ssim(attacked, x, ctx.value_range, complex_images),
        "amplification": (change / clean_norm) / (e_norm / y_norm),
        "lipschitz_lower_bound": change / e_norm,
        "gaussian_relative_error": metrics.relative_error(gaussian, x),
        "relative_perturbation": e_norm / y_norm,
    }


def _worst_of(
    level: float,
    indices: Sequence[int],
    values: dict[str, torch.Tensor],
    e: torch.Tensor,
    x: torch.Tensor,
    clean: torch.Tensor,
    attacked: torch.Tensor,
) -> dict[str, Any]:
    """The level's worst image: its figure and, for the report's image panels, x, Ψ(y),
    Ψ(y+e) and the perturbation."""
    position = int(torch.nan_to_num(values["relative_error"], nan=math.inf).argmax())
    return {
        "level": level,
        "index": int(indices[position]),
        "relative_error": float(values["relative_error"][position]),
        "perturbation": _encode(e[position]),
        "reconstruction": _encode(attacked[position]),
        "original": _encode(x[position]),
        "clean": _encode(clean[position]),
    }


def _images(
    indices: Sequence[int],
    outcomes: list[Any],
    per_level: list[dict[str, torch.Tensor]],
    clean_error: list[float],
    per_level_errors: list[dict[str, torch.Tensor]] | None = None,
) -> list[dict[str, Any]]:
    """Per image, every level's figures (and standard errors, for a sampler's average)."""
    images = []
    for row, index in enumerate(indices):
        levels = []
        for position, (outcome, values) in enumerate(zip(outcomes, per_level, strict=True)):
            level = {
                "level": outcome.level,
                "steps": outcome.steps,
                "optimizer": outcome.found_by[row],
                # the worst perturbation is the smaller level's (this level found nothing above)
                "carried": outcome.carried[row],
                **{name: float(values[name][row]) for name in RAW},
            }
            if per_level_errors is not None:
                errors = per_level_errors[position]
                level["standard_error"] = {name: float(errors[name][row]) for name in REPORTED}
            levels.append(level)
        images.append(
            {"index": int(index), "clean_relative_error": clean_error[row], "levels": levels}
        )
    return images


def _merge_level(level: float, rows: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    finite = [(i, r) for i, r in rows if all(math.isfinite(r[name]) for name in RAW)]
    merged: dict[str, Any] = {"level": level, "non_finite": len(rows) - len(finite)}
    for name, fields in REPORTED.items():
        values = [r[name] for _, r in finite]
        merged[name] = {field: _statistic(field, values) for field in fields}
    merged["relative_perturbation"] = {
        "max": _statistic("max", [r["relative_perturbation"] for _, r in finite])
    }
    if any("standard_error" in r for _, r in rows):  # a stochastic subject's average map
        merged["standard_error"] = {
            name: summary_errors(
                [r[name] for _, r in finite],
                [r["standard_error"][name] for _, r in finite],
                tuple(f for f in fields if f != "std"),
            )
            for name, fields in REPORTED.items()
        }
    steps = [float(r["steps"]) for _, r in rows]
    merged["steps"] = {"mean": _statistic("mean", steps), "max": _statistic("max", steps)}
    # which optimiser's restart gave each image's worst case (an ensemble mixes them)
    found_by = Counter(str(r.get("optimizer", "unknown")) for _, r in rows)
    merged["found_by"] = dict(sorted(found_by.items()))
    # images whose worst case here is the next smaller level's perturbation, evaluated here
    merged["carried"] = sum(bool(r.get("carried", False)) for _, r in rows)
    worst = max(finite, key=lambda pair: pair[1]["relative_error"], default=None)
    merged["worst_image"] = (
        None
        if worst is None
        else {
            "index": worst[0],
            "relative_error": worst[1]["relative_error"],
            "optimizer": worst[1].get("optimizer"),
            "steps": worst[1]["steps"],
        }
    )
    return merged


def _statistic(field: str, values: list[float]) -> float | None:
    if not values:
        return None
    mean = math.fsum(values) / len(values)
    if field == "mean":
        return mean
    if field == "std":
        return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return max(values) if field == "max" else min(values)


def _comparisons(
    config: WorstCaseCheck,
    table: list[dict[str, Any]],
    replicates: int | None = None,
    warnings: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The threshold's bounds against the table. A level without a finite measurement (stopped
    before it was searched, or every output NaN) has nothing below the bound: it fails.

    With `replicates` (a stochastic subject: the table holds estimates with standard errors),
    each bound judges the upper end of the estimate's 95 % interval (`compare_estimate`), and a
    bound inside the interval adds a warning to `warnings`."""
    threshold = config.threshold
    if threshold is None:
        return []
    comparisons = []

    def add(quantity: str, row: dict[str, Any] | None, name: str, bound: float) -> None:
        value = None if row is None else row[name]["max"]
        if replicates is None:
            comparisons.append(compare(quantity, value, bound))
            return
        error = None if row is None else row.get("standard_error", {}).get(name, {}).get("max")
        comparison, warning = compare_estimate(quantity, value, error, replicates, bound)
        comparisons.append(comparison)
        if warning is not None and warnings is not None:
            warnings.append(warning)

    if threshold.max_relative_error is not None:
        at_level = threshold.at_level or config.levels[-1]
        row = next((row for row in table if row["level"] == at_level), None)
        add(
            f"worst-case relative error at level {fmt(at_level)}",
            row,
            "relative_error",
            threshold.max_relative_error,
        )
    if threshold.max_lipschitz is not None:
        bounds = [row["lipschitz_lower_bound"]["max"] for row in table]
        if not bounds or None in bounds:
            add("empirical Lipschitz lower bound", None, "", threshold.max_lipschitz)
        else:  # the level with the largest bound (a sampler's: the largest upper end)
            largest = max(table, key=lambda row: _upper_end(row, replicates))
            add(
                "empirical Lipschitz lower bound",
                largest,
                "lipschitz_lower_bound",
                threshold.max_lipschitz,
            )
    non_finite = sum(row["non_finite"] for row in table)
    if non_finite:  # a NaN under a bounded perturbation is as unstable as it gets
        comparisons.append(compare("outputs that were NaN or infinite", non_finite, 0))
    return comparisons


def _upper_end(row: dict[str, Any], replicates: int | None) -> float:
    """The row's largest Lipschitz lower bound, for a sampler the upper end of its interval."""
    value = float(row["lipschitz_lower_bound"]["max"])
    if replicates is None:
        return value
    error = row.get("standard_error", {}).get("lipschitz_lower_bound", {}).get("max")
    if error is None or not math.isfinite(error):
        return math.inf
    return value + interval_factor(replicates) * error


def _encode(array: torch.Tensor) -> dict[str, Any]:
    data = array.detach().to(torch.float32).cpu().contiguous().numpy()
    return {"shape": list(data.shape), "float32": base64.b64encode(data.tobytes()).decode("ascii")}


def _decode(encoded: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(encoded["float32"])
    return np.frombuffer(raw, dtype=np.float32).reshape(encoded["shape"]).copy()
