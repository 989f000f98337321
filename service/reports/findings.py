"""What each check result of a report found, in words: the short sentence the HTML report, the
console and JUnit show, next to the threshold comparisons the engine wrote into the result
(measured value against bound; schemas.reports.ThresholdComparison). Nothing here compares a
value with a bound: the check did, once, and its verdict follows from its comparisons
(schemas.verdicts). Reads the plain JSON of report.json (docs/reports.md); torch-free.

Results carry no config index, but the engine writes them in config order with the model's
result first, so a `model` result starts the next config check (docs/reports.md, `checks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.verdicts import fmt

__all__ = [
    "Comparison",
    "Finding",
    "bracket_lines",
    "bracket_rows",
    "check_indices",
    "findings",
    "fmt",
]


@dataclass(frozen=True)
class Comparison:
    """One threshold comparison of a check result, as the engine wrote it: passes when
    `measured <= bound` (`at_most`) or `measured >= bound` (`at_least`)."""

    quantity: str
    measured: float | None
    bound: float
    passed: bool
    at_least: bool = False  # a lower bound (robust accuracy, median norm)

    @classmethod
    def from_report(cls, data: dict[str, Any]) -> Comparison:
        measured = data.get("measured")
        return cls(
            quantity=str(data.get("quantity", "?")),
            measured=float(measured) if isinstance(measured, int | float) else None,
            bound=float(data.get("bound", 0.0)),
            passed=bool(data.get("passed")),
            at_least=data.get("direction") == "at_least",
        )

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


def _random_noise(config: dict[str, Any], result: dict[str, Any]) -> str:
    threshold = config.get("threshold") or {}
    row = _level_row(result, result.get("verdict_level") or threshold.get("at_level"))
    level = _get(row, "level")
    high = _get(row, "failure_probability", "ci_high")
    if result.get("task") == "classification":  # docs/classifiers.md: failures are errors
        return (
            f"Under random noise of relative size {fmt(level)}, "
            f"{int(_get(row, 'failures') or 0)} of {int(_get(row, 'trials') or 0)} samples were "
            f"misclassified (accuracy {fmt(_get(row, 'accuracy'))}, clean accuracy "
            f"{fmt(_get(result, 'clean_accuracy'))}; 95 % interval of the failure probability "
            f"up to {fmt(high)})."
        )
    return (
        f"Under random noise of relative size {fmt(level)} (uniform on the sphere), "
        f"{int(_get(row, 'failures') or 0)} of {int(_get(row, 'trials') or 0)} samples had "
        f"a relative error above τ = {fmt(_get(result, 'failure_error'))} (failure "
        f"probability {fmt(_get(row, 'failure_probability', 'estimate'))}, 95 % interval up to "
        f"{fmt(high)}); mean relative error {fmt(_get(row, 'relative_error', 'mean'))}."
    )


def _worst_case(config: dict[str, Any], result: dict[str, Any]) -> str:
    threshold = config.get("threshold") or {}
    row = _level_row(result, threshold.get("at_level"))
    found = row.get("worst_image") if isinstance(row, dict) else None
    search = (
        f" (found by {found['optimizer']} in {found.get('steps', '?')} steps)"
        if isinstance(found, dict) and found.get("optimizer")
        else ""
    )
    return (
        f"A worst-case perturbation of relative size {fmt(_get(row, 'level'))} "
        f"({result.get('space', '?')} space) raised the relative error to "
        f"{fmt(_get(row, 'relative_error', 'max'))}{search}, against "
        f"{fmt(_get(result, 'clean_relative_error', 'max'))} without perturbation and "
        f"{fmt(_get(row, 'gaussian_relative_error', 'max'))} for random noise of the same size."
    ) + _bracket_sentence(result)


PROOF_WORDS = {
    "proven": "the certified bounds prove the threshold",
    "unproven": "the certified bounds do not prove the threshold",
    "refuted": "the search already exceeds the threshold",
    "unavailable": "no certified bound",
}


def bracket_rows(result: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """A check's brackets with `certify` (docs/reports.md): (where, what is bracketed, the
    bracket) per worst_case level ("level 0.05"), or lipschitz's one ("radius 0.01"); [] without
    `certify`."""
    section = result.get("certify")
    if not isinstance(section, dict):
        return []
    certified = result.get("certified")
    if isinstance(certified, dict):  # lipschitz: one bracket, over a ball of `radius`
        where = f"radius {fmt(_get(section, 'radius'))}"
        return [(where, "Jacobian norm over the ball", certified)]
    rows = []
    for row in result.get("levels") or []:
        bracket = row.get("certified") if isinstance(row, dict) else None
        if isinstance(bracket, dict):
            rows.append((f"level {fmt(_get(row, 'level'))}", "change per unit radius", bracket))
    return rows


def bracket_lines(result: dict[str, Any]) -> list[str]:
    """A check with `certify`: each bracket in words, found ≤ truth ≤ U (docs/reports.md,
    "worst_case", "lipschitz"), then the proof; [] without it."""
    section = result.get("certify")
    if not isinstance(section, dict):
        return []
    lines = []
    for where, what, bracket in bracket_rows(result):
        proven = bracket.get("proven")
        state = "" if proven is None else ("; proven" if proven else "; not proven")
        error = ""
        if isinstance(bracket.get("relative_error"), dict):
            error = (
                f"; relative error [{fmt(_get(bracket, 'relative_error', 'found'), 6)}, "
                f"{fmt(_get(bracket, 'relative_error', 'upper'), 6)}]"
            )
        lines.append(
            f"bracket at {where}: {what} "
            f"[{fmt(_get(bracket, 'found'), 6)}, {fmt(_get(bracket, 'upper'), 6)}] "
            f"(U/L {fmt(_get(bracket, 'ratio'))}){error}{state}"
        )
    proof = section.get("proof")
    summary = f"proof: {proof or 'none (no threshold)'}"
    if proof in PROOF_WORDS:
        summary += f" ({PROOF_WORDS[proof]}"
        if proof == "unproven":
            summary += f"; certify.unproven = {section.get('unproven')!r}"
        summary += ")"
    if section.get("reason"):
        summary += f"; {section['reason']}"
    if section.get("proven_level") is not None:
        summary += f"; proven up to level {fmt(_get(section, 'proven_level'))}"
    return [*lines, summary]


def _bracket_sentence(result: dict[str, Any]) -> str:
    section = result.get("certify")
    if not isinstance(section, dict):
        return ""
    if section.get("reason"):
        return f" No certified bound: {section['reason']}."
    rows = [r for r in result.get("levels") or [] if isinstance(r, dict)]
    bracket = rows[-1].get("certified") if rows else None
    if not isinstance(bracket, dict):
        return ""
    words = PROOF_WORDS.get(str(section.get("proof")), "")
    return (
        f" Certified ({section.get('intermediate')} intermediate bounds): at level "
        f"{fmt(_get(rows[-1], 'level'))} the worst change per unit radius lies in "
        f"[{fmt(_get(bracket, 'found'))}, {fmt(_get(bracket, 'upper'))}]"
        + (f"; {words}." if words else ".")
    )


def _lipschitz(config: dict[str, Any], result: dict[str, Any]) -> str:
    sentence = (
        f"The spectral norm of the Jacobian, a lower bound of the local Lipschitz constant, is "
        f"{fmt(_get(result, 'jacobian_norm', 'mean'))} on average and "
        f"{fmt(_get(result, 'jacobian_norm', 'max'))} at most."
    )
    empirical = result.get("empirical_lower_bound")
    if isinstance(empirical, dict):
        sentence += (
            f" The {empirical.get('check')} check found a ratio ‖Ψ(y+e) − Ψ(y)‖/‖e‖ of "
            f"{fmt(empirical.get('value'))} (level {fmt(empirical.get('level'))})."
        )
    section = result.get("certify")
    bracket = result.get("certified")
    if isinstance(section, dict) and section.get("reason"):
        sentence += f" No certified bound: {section['reason']}."
    elif isinstance(section, dict) and isinstance(bracket, dict):
        words = PROOF_WORDS.get(str(section.get("proof")), "")
        sentence += (
            f" Certified ({section.get('intermediate')} intermediate bounds): over the ball of "
            f"radius {fmt(_get(section, 'radius'))}·‖y‖ around each image the Jacobian norm is "
            f"at most {fmt(_get(bracket, 'upper'))}" + (f"; {words}." if words else ".")
        )
    return sentence


def _false_negative(config: dict[str, Any], result: dict[str, Any]) -> str:
    lesion = result.get("lesion") or {}
    sentence = (
        f"A {lesion.get('shape', 'lesion')} of size {lesion.get('size', '?')} and contrast "
        f"{fmt(_get(lesion, 'contrast'))} ({result.get('search', '?')} search) was missed in "
        f"{int(_get(result, 'misses') or 0)} of {int(_get(result, 'trials') or 0)} trials "
        f"(miss rate {fmt(_get(result, 'miss_rate', 'estimate'))}, 95 % interval up to "
        f"{fmt(_get(result, 'miss_rate', 'ci_high'))}); lowest recovery ρ "
        f"{fmt(_get(result, 'recovery', 'min'))}."
    )
    worst = result.get("worst_placement")
    if isinstance(worst, dict):  # reports before issue 19 have no relative recovery
        sentence += (
            f" At the worst placement the network recovered {fmt(worst.get('recovery'))} of the "
            f"lesion where the data-consistent reconstruction A⁺ recovers "
            f"{fmt(worst.get('visible_fraction'))}: {fmt(worst.get('relative_recovery'))} of what "
            f"the data carries (a miss is below {fmt(result.get('relative_threshold'))})."
        )
    unrecoverable = int(_get(result, "unrecoverable", "count") or 0)
    if unrecoverable:
        sentence += (
            f" {unrecoverable} placement(s) were left out: the measurements carry less than "
            f"{fmt(result.get('min_visible_fraction'))} of the lesion, so no stable "
            f"reconstruction could return it."
        )
    return sentence


def _false_positive(config: dict[str, Any], result: dict[str, Any]) -> str:
    return (
        f"A measurement perturbation of relative size {fmt(_get(result, 'delta'))} made a detail "
        f"of contrast up to {fmt(_get(result, 'spurious_contrast', 'max'))} (of the value range) "
        f"appear where the image has none "
        f"(mean {fmt(_get(result, 'spurious_contrast', 'mean'))})."
    )


def _kernel(config: dict[str, Any], result: dict[str, Any]) -> str:
    returns = (result.get("hallucination") or {}).get("returns") or {}
    count = int(_get(result, "certificate_count") or 0)
    return (
        f"For details invisible to the operator, the reconstruction was nearer to x in "
        f"{returns.get('x', 0)} image(s) and to x + z in {returns.get('x+z', 0)}. "
        + (
            f"{count} certificate(s) prove a local Lipschitz constant of at least "
            f"{fmt(_get(result, 'best_lower_bound'))} (the worst-case search reached the "
            f"theorem's bound at {int(_get(result, 'confirmation', 'confirmed') or 0)})."
            if count
            else "No pair met the theorem's conditions: no certificate."
        )
    )


def _more_samples(config: dict[str, Any], result: dict[str, Any]) -> str:
    falls = result.get("falls") or []
    drops = [_get(f, "psnr_drop") for f in falls]
    largest = max((d for d in drops if d is not None), default=0.0)
    monotone = result.get("monotone")
    return f"As the samples rise ({result.get('parameter', '?')}), the quality " + (
        "never falls."
        if monotone is True
        else f"falls {len(falls)} time(s), by up to {fmt(largest)} dB of PSNR."
        if monotone is False
        else "could not be compared (fewer than two levels ran)."
    )


def _adversarial(config: dict[str, Any], result: dict[str, Any]) -> str:
    threshold = config.get("threshold") or {}
    rows = result.get("levels") or []
    at = threshold.get("at_epsilon")
    row = next((r for r in rows if r.get("epsilon") == at), None) if at else None
    row = row if row is not None else (rows[-1] if rows else None)
    return (
        f"Against {result.get('attack', '?')} ({result.get('norm', '?')}, "
        f"ε = {fmt(_get(row, 'epsilon'))}) the robust accuracy is "
        f"{fmt(_get(row, 'robust_accuracy'))}, against a clean accuracy of "
        f"{fmt(_get(result, 'clean_accuracy'))}."
    )


def _minimal_perturbation(config: dict[str, Any], result: dict[str, Any]) -> str:
    median = _get(result, "norms", "median")
    # not-found inputs count as +∞ (docs/reports.md): a null median means more than half of them
    shown = "+∞ (more than half of the inputs without an adversarial point found)"
    # which attack of the ensemble found each input's smallest point (the per-input field too)
    counts = result.get("found_by") or {}
    found_by = ", ".join(f"{name} {count}" for name, count in counts.items())
    return (
        f"The smallest adversarial perturbations ({result.get('attack', '?')}, "
        f"{result.get('norm', '?')}) have a median norm of "
        f"{fmt(median) if median is not None else shown} (10 % below "
        f"{fmt(_get(result, 'norms', 'q10'))}); none found for "
        f"{int(_get(result, 'not_found') or 0)} input(s)"
        + (f"; found by {found_by}." if found_by else ".")
    )


def _universal(config: dict[str, Any], result: dict[str, Any]) -> str:
    return (
        f"One perturbation of norm {fmt(_get(result, 'perturbation_norm'))} fooled "
        f"{int(_get(result, 'fooled') or 0)} of {int(_get(result, 'trials') or 0)} held-out "
        f"inputs (fooling rate {fmt(_get(result, 'fooling_rate', 'estimate'))}, 95 % interval up "
        f"to {fmt(_get(result, 'fooling_rate', 'ci_high'))})."
    )


# The sentence of each check kind (the check's own module decides its comparisons and verdict).
DESCRIBERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], str]] = {
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
        if config.get("kind") != kind:  # a report not written by this engine: no config
            config = {}
        describe = DESCRIBERS.get(kind)
        sentence = (
            f"{kind}: verdict {result.get('verdict', 'info')}; details in report.json."
            if describe is None
            else describe(config, result)
        )
        comparisons = [
            Comparison.from_report(c)
            for c in result.get("comparisons") or []
            if isinstance(c, dict)
        ]
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
