"""What each check result of a report found, in words and numbers: the short sentence the HTML
report shows, and the threshold comparisons (measured value against bound) that JUnit turns
into test cases. Reads the plain JSON of report.json (docs/report.md); torch-free.

Results carry no config index, but the engine writes them in config order with the model's
result first, so a `model` result starts the next config check (docs/report.md, `checks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Comparison:
    """One bound of a threshold: passes when `measured <= bound` (or `>=` for a lower bound)."""

    quantity: str
    measured: float | None
    bound: float
    passed: bool
    at_least: bool = False  # a lower bound (robust accuracy, median norm)

    @property
    def relation(self) -> str:
        """The sign between measured and bound as the result stands."""
        if self.at_least:
            return "≥" if self.passed else "<"
        return "≤" if self.passed else ">"


@dataclass(frozen=True)
class Finding:
    index: int  # position of the check in config.checks
    kind: str
    subject: str
    verdict: str
    sentence: str
    config: dict[str, Any]
    result: dict[str, Any]
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"c{self.index:02d} {self.kind} ({self.subject})"

    @property
    def has_threshold(self) -> bool:
        return bool(self.config.get("threshold"))


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _compare(
    quantity: str, measured: float | None, bound: float | None, at_least: bool = False
) -> list[Comparison]:
    """The comparison of a threshold's bound, none when the threshold does not set it."""
    if bound is None:
        return []
    passed = (
        measured is not None
        and math.isfinite(measured)
        and (measured >= bound if at_least else measured <= bound)
    )
    return [Comparison(quantity, measured, float(bound), passed, at_least=at_least)]


def _level_row(result: dict[str, Any], level: float | None) -> dict[str, Any] | None:
    rows = result.get("levels") or []
    if not rows:
        return None
    if level is None:
        return dict(rows[-1])
    return next((dict(r) for r in rows if r.get("level") == level), None)


def _get(row: dict[str, Any] | None, *path: str) -> float | None:
    value: Any = row
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, int | float) else None


def _random_noise(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, list[Comparison]]:
    threshold = config.get("threshold") or {}
    level = result.get("verdict_level") or threshold.get("at_level")
    row = _level_row(result, level)
    level = _get(row, "level")
    estimate = _get(row, "failure_probability", "estimate")
    high = _get(row, "failure_probability", "ci_high")
    if result.get("task") == "classification":  # docs/classifiers.md: failures are errors
        sentence = (
            f"Under random noise of relative size {fmt(level)}, "
            f"{int(_get(row, 'failures') or 0)} of {int(_get(row, 'trials') or 0)} samples were "
            f"misclassified (accuracy {fmt(_get(row, 'accuracy'))}, clean accuracy "
            f"{fmt(_get(result, 'clean_accuracy'))}; 95 % interval of the failure probability "
            f"up to {fmt(high)})."
        )
    else:
        sentence = (
            f"Under random noise of relative size {fmt(level)} (uniform on the sphere), "
            f"{int(_get(row, 'failures') or 0)} of {int(_get(row, 'trials') or 0)} samples had "
            f"a relative error above τ = {fmt(_get(result, 'failure_error'))} (failure "
            f"probability {fmt(estimate)}, 95 % interval up to {fmt(high)}); mean relative error "
            f"{fmt(_get(row, 'relative_error', 'mean'))}."
        )
    comparisons = _compare(
        f"failure probability (upper 95 % bound) at level {fmt(level)}",
        high,
        threshold.get("max_failure_probability"),
    )
    return sentence, comparisons


def _worst_case(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, list[Comparison]]:
    threshold = config.get("threshold") or {}
    row = _level_row(result, threshold.get("at_level"))
    level = _get(row, "level")
    worst = _get(row, "relative_error", "max")
    gaussian = _get(row, "gaussian_relative_error", "max")
    clean = _get(result, "clean_relative_error", "max")
    found = row.get("worst_image") if isinstance(row, dict) else None
    search = (
        f" (found by {found['optimizer']} in {found.get('steps', '?')} steps)"
        if isinstance(found, dict) and found.get("optimizer")
        else ""
    )
    sentence = (
        f"A worst-case perturbation of relative size {fmt(level)} ({result.get('space', '?')} "
        f"space) raised the relative error to {fmt(worst)}{search}, against {fmt(clean)} without "
        f"perturbation and {fmt(gaussian)} for random noise of the same size."
    )
    comparisons = _compare(
        f"worst-case relative error at level {fmt(level)}",
        worst,
        threshold.get("max_relative_error"),
    )
    bounds = [_get(r, "lipschitz_lower_bound", "max") for r in result.get("levels") or []]
    largest = max((b for b in bounds if b is not None), default=None)
    if threshold.get("max_lipschitz") is not None:
        comparisons += _compare(
            "empirical Lipschitz lower bound", largest, threshold["max_lipschitz"]
        )
    non_finite = sum(int(_get(r, "non_finite") or 0) for r in result.get("levels") or [])
    if non_finite and threshold:
        comparisons.append(Comparison("outputs that were NaN or infinite", non_finite, 0, False))
    return sentence, comparisons


def _lipschitz(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, list[Comparison]]:
    threshold = config.get("threshold") or {}
    largest = _get(result, "jacobian_norm", "max")
    sentence = (
        f"The spectral norm of the Jacobian, a lower bound of the local Lipschitz constant, is "
        f"{fmt(_get(result, 'jacobian_norm', 'mean'))} on average and {fmt(largest)} at most."
    )
    empirical = result.get("empirical_lower_bound")
    if isinstance(empirical, dict):
        sentence += (
            f" The {empirical.get('check')} check found a ratio ‖Ψ(y+e) − Ψ(y)‖/‖e‖ of "
            f"{fmt(empirical.get('value'))} (level {fmt(empirical.get('level'))})."
        )
    return sentence, _compare(
        "largest Jacobian spectral norm", largest, threshold.get("max_jacobian_norm")
    )


def _false_negative(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, list[Comparison]]:
    threshold = config.get("threshold") or {}
    lesion = result.get("lesion") or {}
    rate = "ci_high" if result.get("search") == "noise" else "estimate"
    sentence = (
        f"A {lesion.get('shape', 'lesion')} of size {lesion.get('size', '?')} and contrast "
        f"{fmt(_get(lesion, 'contrast'))} ({result.get('search', '?')} search) was missed in "
        f"{int(_get(result, 'misses') or 0)} of {int(_get(result, 'trials') or 0)} trials "
        f"(miss rate {fmt(_get(result, 'miss_rate', 'estimate'))}, 95 % interval up to "
        f"{fmt(_get(result, 'miss_rate', 'ci_high'))}); lowest recovery ρ "
        f"{fmt(_get(result, 'recovery', 'min'))}."
    )
    unrecoverable = int(_get(result, "unrecoverable", "count") or 0)
    if unrecoverable:
        sentence += (
            f" {unrecoverable} placement(s) were left out: the measurements carry less than the "
            f"recovery threshold of the lesion, so no stable reconstruction could return it."
        )
    quantity = "miss rate" + (" (upper 95 % bound)" if rate == "ci_high" else "")
    measured = _get(result, "miss_rate", rate)
    return sentence, _compare(quantity, measured, threshold.get("max_miss_rate"))


def _false_positive(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, list[Comparison]]:
    threshold = config.get("threshold") or {}
    largest = _get(result, "spurious_contrast", "max")
    sentence = (
        f"A measurement perturbation of relative size {fmt(_get(result, 'delta'))} made a detail "
        f"of contrast up to {fmt(largest)} (of the value range) appear where the image has none "
        f"(mean {fmt(_get(result, 'spurious_contrast', 'mean'))})."
    )
    return sentence, _compare(
        "largest spurious contrast", largest, threshold.get("max_spurious_contrast")
    )


def _kernel(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, list[Comparison]]:
    threshold = config.get("threshold") or {}
    best = _get(result, "best_lower_bound")
    returns = (result.get("hallucination") or {}).get("returns") or {}
    count = int(_get(result, "certificate_count") or 0)
    sentence = (
        f"For details invisible to the operator, the reconstruction was nearer to x in "
        f"{returns.get('x', 0)} image(s) and to x + z in {returns.get('x+z', 0)}. "
        + (
            f"{count} certificate(s) prove a local Lipschitz constant of at least {fmt(best)} "
            f"(the worst-case search reached the theorem's bound at "
            f"{int(_get(result, 'confirmation', 'confirmed') or 0)})."
            if count
            else "No pair met the theorem's conditions: no certificate."
        )
    )
    if best is None:  # no certificate: nothing is proven, so no bound can be exceeded
        return sentence, []
    return sentence, _compare(
        "proven Lipschitz lower bound", best, threshold.get("max_certified_lipschitz")
    )


def _more_samples(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, list[Comparison]]:
    threshold = config.get("threshold") or {}
    falls = result.get("falls") or []
    drops = [_get(f, "psnr_drop") for f in falls]
    largest = max((d for d in drops if d is not None), default=0.0)
    monotone = result.get("monotone")
    sentence = f"As the samples rise ({result.get('parameter', '?')}), the quality " + (
        "never falls."
        if monotone is True
        else f"falls {len(falls)} time(s), by up to {fmt(largest)} dB of PSNR."
        if monotone is False
        else "could not be compared (fewer than two levels ran)."
    )
    return sentence, _compare("largest PSNR fall (dB)", largest, threshold.get("max_psnr_drop"))


def _adversarial(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, list[Comparison]]:
    threshold = config.get("threshold") or {}
    rows = result.get("levels") or []
    at = threshold.get("at_epsilon")
    row = next((r for r in rows if r.get("epsilon") == at), None) if at else None
    row = row if row is not None else (rows[-1] if rows else None)
    epsilon = _get(row, "epsilon")
    accuracy = _get(row, "robust_accuracy")
    sentence = (
        f"Against {result.get('attack', '?')} ({result.get('norm', '?')}, ε = {fmt(epsilon)}) "
        f"the robust accuracy is {fmt(accuracy)}, against a clean accuracy of "
        f"{fmt(_get(result, 'clean_accuracy'))}."
    )
    return sentence, _compare(
        f"robust accuracy at ε = {fmt(epsilon)}",
        accuracy,
        threshold.get("min_robust_accuracy"),
        at_least=True,
    )


def _minimal_perturbation(
    config: dict[str, Any], result: dict[str, Any]
) -> tuple[str, list[Comparison]]:
    threshold = config.get("threshold") or {}
    median = _get(result, "norms", "median")
    # not-found inputs count as +∞ (docs/report.md): a null median means more than half of them
    shown = "+∞ (more than half of the inputs without an adversarial point found)"
    sentence = (
        f"The smallest adversarial perturbations ({result.get('attack', '?')}, "
        f"{result.get('norm', '?')}) have a median norm of "
        f"{fmt(median) if median is not None else shown} (10 % below "
        f"{fmt(_get(result, 'norms', 'q10'))}); none found for "
        f"{int(_get(result, 'not_found') or 0)} input(s)."
    )
    bound = threshold.get("min_median_norm")
    if median is None and bound is not None:
        # the check's own verdict decides (unmeasured_median); the comparison says the same
        passed = result.get("verdict") == "pass"
        quantity = "median minimal perturbation norm (+∞: most inputs have none found)"
        return sentence, [Comparison(quantity, None, float(bound), passed, at_least=True)]
    return sentence, _compare("median minimal perturbation norm", median, bound, at_least=True)


def _universal(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, list[Comparison]]:
    threshold = config.get("threshold") or {}
    high = _get(result, "fooling_rate", "ci_high")
    sentence = (
        f"One perturbation of norm {fmt(_get(result, 'perturbation_norm'))} fooled "
        f"{int(_get(result, 'fooled') or 0)} of {int(_get(result, 'trials') or 0)} held-out "
        f"inputs (fooling rate {fmt(_get(result, 'fooling_rate', 'estimate'))}, 95 % interval up "
        f"to {fmt(high)})."
    )
    return sentence, _compare(
        "fooling rate (upper 95 % bound)", high, threshold.get("max_fooling_rate")
    )


DESCRIBERS = {
    "random_noise": _random_noise,
    "worst_case": _worst_case,
    "lipschitz": _lipschitz,
    "false_negative": _false_negative,
    "false_positive": _false_positive,
    "kernel": _kernel,
    "more_samples": _more_samples,
    "adversarial": _adversarial,
    "minimal_perturbation": _minimal_perturbation,
    "universal": _universal,
}


def check_indices(report: dict[str, Any]) -> list[int]:
    """The config index of every result in report["checks"]."""
    indices: list[int] = []
    current = -1
    for result in report.get("checks") or []:
        if result.get("subject") == "model" or current < 0:
            current += 1
        indices.append(current)
    return indices


def findings(report: dict[str, Any]) -> list[Finding]:
    configs = (report.get("config") or {}).get("checks") or []
    found = []
    for index, result in zip(check_indices(report), report.get("checks") or [], strict=True):
        kind = str(result.get("kind", "?"))
        config = configs[index] if index < len(configs) else {}
        if config.get("kind") != kind:  # a report not written by this engine: no thresholds
            config = {}
        describe = DESCRIBERS.get(kind)
        if describe is None:
            sentence = f"{kind}: verdict {result.get('verdict', 'info')}; details in report.json."
            comparisons: list[Comparison] = []
        else:
            sentence, comparisons = describe(config, result)
        found.append(
            Finding(
                index=index,
                kind=kind,
                subject=str(result.get("subject", "model")),
                verdict=str(result.get("verdict", "info")),
                sentence=sentence,
                config=config,
                result=result,
                comparisons=comparisons,
            )
        )
    return found
