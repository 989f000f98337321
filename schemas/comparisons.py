"""Comparing a model with a reference (its previous version) audited in the same run.

`compare_with: {"model_id": ...}` in an audit request (schemas.audits.CompareWith) adds a
second subject, `reference`, run on the same images, perturbation draws and seeds as the
model. Every check result of both is read for its headline figures (per level or ε where the
check has levels): the quantity the check's threshold compares, taken at each level.
`comparison_section` pairs them and judges each pair with `schemas.verdicts.compare_regression`
against the check's `threshold.max_regression` (default `DEFAULT_MAX_REGRESSION`). A figure only
a sampler's result has (`SAMPLER_FIGURES`) is compared when both models have it.
Torch-free (docs/reports.md, "Comparing with a previous model")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from schemas.common import DEFAULT_MAX_REGRESSION
from schemas.model_spec import ModelFormat, ModelSpec
from schemas.verdicts import check_verdict, compare_regression, fmt

# spec fields two models must share to be audited on the same inputs
COMPATIBLE_SPEC_FIELDS = ("task", "input", "image_shape", "num_classes", "value_range")


class ReferenceModel(BaseModel):
    """The reference model as the engine gets it: a file (relative to the job directory or
    absolute), its format, sha256 and spec, and its id on the service (None locally)."""

    file: str
    format: ModelFormat
    sha256: str
    spec: ModelSpec
    model_id: str | None = None


def spec_problems(spec: ModelSpec, reference: ModelSpec) -> list[str]:
    """Why two models cannot be audited on the same inputs ([] when they can)."""
    return [
        f"{name} differs: {getattr(spec, name)!r} (model) vs {getattr(reference, name)!r} "
        "(reference)"
        for name in COMPATIBLE_SPEC_FIELDS
        if getattr(spec, name) != getattr(reference, name)
    ]


# (quantity, level or None, value or None, "at_most": lower is better | "at_least")
Figure = tuple[str, float | None, float | None, str]

HALLUCINATION = "hallucination probability under the perturbation (upper 95 % bound)"
# Figures only a stochastic model's result has: compared when both models have them (two
# samplers); a deterministic model has none, so against one the figure is left out.
SAMPLER_FIGURES = (HALLUCINATION,)


def _get(data: Any, *path: str) -> float | None:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return float(data) if isinstance(data, int | float) and not isinstance(data, bool) else None


def _per_level(
    result: Mapping[str, Any], quantity: str, level_key: str, *path: str, direction: str
) -> list[Figure]:
    return [
        (quantity, _get(row, level_key), _get(row, *path), direction)
        for row in result.get("levels", [])
        if isinstance(row, Mapping)
    ]


def headline_figures(result: Mapping[str, Any]) -> list[Figure]:
    """The figures a check result is compared on: its threshold's quantity, per level."""
    kind = result.get("kind")
    if kind == "random_noise":
        return _per_level(
            result,
            "failure probability (upper 95 % bound)",
            "level",
            "failure_probability",
            "ci_high",
            direction="at_most",
        )
    if kind == "worst_case":
        return _per_level(
            result,
            "worst-case relative error",
            "level",
            "relative_error",
            "max",
            direction="at_most",
        )
    if kind == "adversarial":
        return _per_level(
            result, "robust accuracy", "epsilon", "robust_accuracy", direction="at_least"
        )
    if kind == "lipschitz":
        return [
            (
                "largest Jacobian spectral norm",
                None,
                _get(result, "jacobian_norm", "max"),
                "at_most",
            )
        ]
    if kind == "false_negative":
        miss = "ci_high" if result.get("search") == "noise" else "estimate"
        return [("miss rate", None, _get(result, "miss_rate", miss), "at_most")]
    if kind == "false_positive":
        figures: list[Figure] = [
            ("largest spurious contrast", None, _get(result, "spurious_contrast", "max"), "at_most")
        ]
        if isinstance(result.get("hallucination"), Mapping):  # a sampler's (SAMPLER_FIGURES)
            figures.append(
                (
                    HALLUCINATION,
                    None,
                    _get(result, "hallucination", "attacked", "ci_high"),
                    "at_most",
                )
            )
        return figures
    if kind == "kernel":
        return [("proven Lipschitz lower bound", None, _get(result, "best_lower_bound"), "at_most")]
    if kind == "more_samples":
        falls = [_get(f, "psnr_drop") for f in result.get("falls", []) if isinstance(f, Mapping)]
        worst = max((f for f in falls if f is not None), default=0.0)
        measured = None if result.get("monotone") is None else worst
        return [("largest PSNR fall (dB)", None, measured, "at_most")]
    if kind == "minimal_perturbation":
        return [
            ("median minimal perturbation norm", None, _get(result, "norms", "median"), "at_least")
        ]
    if kind == "universal":
        return [
            (
                "fooling rate (upper 95 % bound)",
                None,
                _get(result, "fooling_rate", "ci_high"),
                "at_most",
            )
        ]
    return []


def comparison_section(
    checks_config: Sequence[Any],
    results: Sequence[Mapping[str, Any]],
    reference: Mapping[str, Any],
) -> dict[str, Any]:
    """The report's `comparison`: per check, the model's and the reference's figures, their
    difference and relative regression, judged against the check's max_regression.
    `results` are the check results in report order, each with `check_index` implied by its
    position among results of the same subject."""
    by_subject: dict[str, list[Mapping[str, Any]]] = {}
    for result in results:
        by_subject.setdefault(str(result.get("subject")), []).append(result)
    model_results = by_subject.get("model", [])
    reference_results = by_subject.get("reference", [])
    checks = []
    for index, (config, new, old) in enumerate(
        zip(checks_config, model_results, reference_results, strict=True)
    ):
        threshold = getattr(config, "threshold", None)
        bound = getattr(threshold, "max_regression", None)
        max_regression = DEFAULT_MAX_REGRESSION if bound is None else float(bound)
        figures = []
        old_figures = {(q, lv): v for q, lv, v, _ in headline_figures(old)}
        for quantity, level, value, direction in headline_figures(new):
            if quantity in SAMPLER_FIGURES and (quantity, level) not in old_figures:
                continue  # the reference is no sampler: nothing to compare with
            label = quantity if level is None else f"{quantity} at {_level_name(new)} {fmt(level)}"
            figures.append(
                compare_regression(
                    label,
                    level,
                    value,
                    old_figures.get((quantity, level)),
                    max_regression,
                    direction,
                )
            )
        checks.append(
            {
                "index": index,
                "kind": config.kind,
                "max_regression": max_regression,
                "figures": figures,
                "verdict": check_verdict(figures),
            }
        )
    return {
        "reference": dict(reference),
        "checks": checks,
        "verdict": "fail" if any(c["verdict"] == "fail" for c in checks) else "pass",
    }


def _level_name(result: Mapping[str, Any]) -> str:
    return "ε =" if result.get("kind") == "adversarial" else "level"
