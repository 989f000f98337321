"""Audit checks: a discriminated union on `kind`.

A check that runs an attack is composed of two parts, as Foolbox separates an attack's
hyper-parameters (the attack object) from what it is called with (model, inputs, criterion,
epsilons): its threat model (`...ThreatModel`: the perturbation set, levels or ε, the norm and
space, the target, everything a perfect optimiser's answer depends on) and its search settings
(`...Search`: optimiser, steps, restarts, step size, which only decide how close the attack gets
to that answer). The check inherits the fields of both, so its request JSON stays flat;
`threat_model()` and `search_settings()` give each part back, and the engine's attacks take them
as separate arguments (docs/architecture.md, "Threat model and search settings"). The engine
keeps a registry keyed by the same `kind` values.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from schemas.checks_classifier import (
    AdversarialCheck,
    MinimalPerturbationCheck,
    UniversalCheck,
)
from schemas.checks_theorem import (
    THEOREM_CHECK_KINDS,
    FalseNegativeCheck,
    FalsePositiveCheck,
    KernelCheck,
    MoreSamplesCheck,
)
from schemas.common import MAX_SEED, RegressionBound, StrictModel, TaggedModel, model_part
from schemas.sampler import AveragingSettings

SAMPLER_AVERAGING = (
    "For a stochastic model: the average map's draws and replicates (docs/theorem.md, "
    "'Auditing a sampler'); null: the defaults; ignored for a deterministic model"
)

# Each level is a relative size in (0, 10] (stated per item, so the schema says it too); that
# they strictly increase is checked by `_check_levels` and stated in the description.
Level = Annotated[float, Field(gt=0.0, le=10.0)]
Levels = Annotated[
    list[Level],
    Field(
        min_length=1,
        max_length=32,
        description="Relative sizes in (0, 10], strictly increasing (no repeats)",
    ),
]


def _check_levels(levels: list[float]) -> list[float]:
    if any(not (0.0 < lv <= 10.0) for lv in levels):
        raise ValueError("every level is a relative size in (0, 10]")
    if sorted(levels) != levels or len(set(levels)) != len(levels):
        raise ValueError("levels must be strictly increasing")
    return levels


class WorstCaseThreshold(RegressionBound):
    """At least one of max_relative_error and max_lipschitz; at_level only with
    max_relative_error, and then one of the check's levels."""

    max_relative_error: float | None = Field(default=None, gt=0.0)
    at_level: float | None = Field(
        default=None, gt=0.0, description="Level the error bound applies to; default the largest"
    )
    max_lipschitz: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _some_bound(self) -> WorstCaseThreshold:
        if self.max_relative_error is None and self.max_lipschitz is None:
            raise ValueError("give max_relative_error and/or max_lipschitz")
        if self.at_level is not None and self.max_relative_error is None:
            raise ValueError("at_level only qualifies max_relative_error")
        return self


class WorstCaseThreatModel(StrictModel):
    """What the worst_case attacker may do and what it degrades: perturbations of relative size
    δ (each of `levels`) in measurement space (‖e‖ ≤ δ‖y‖) or image space (‖r‖ ≤ δ‖x‖, e = A r),
    inside that ball or priced by λ (`penalized`), maximising the error against `target`."""

    levels: Levels = Field(default_factory=lambda: [0.01, 0.02, 0.05])
    space: Literal["measurement", "image"] = "measurement"
    target: Literal["ground_truth", "reconstruction"] = "ground_truth"
    formulation: Literal["ball", "penalized"] = "ball"
    lambda_: float = Field(default=1.0, gt=0.0, alias="lambda", description="Penalty weight")

    _levels = field_validator("levels")(_check_levels)


class WorstCaseSearch(StrictModel):
    """How the worst_case attack searches its threat model: optimiser, budget, step size."""

    optimizer: Literal["pgd", "adam", "momentum", "ensemble"] = Field(
        default="pgd",
        description="pgd: ℓ2 ascent with an adaptive step (exact on linear models); "
        "ensemble: half the restarts pgd, half adam",
    )
    steps: int = Field(default=100, ge=1, le=10_000)
    restarts: int = Field(default=4, ge=1, le=256)
    step_size: float | None = Field(
        default=None,
        gt=0.0,
        le=10.0,
        description="Relative to the radius; default 2.0 for pgd (its first step, then halved "
        "adaptively), 0.1 for adam and momentum (fixed)",
    )
    early_stop_tolerance: float = Field(
        default=1e-3,
        ge=0.0,
        description="After half its steps, stop a level once every restart's iterate and best "
        "point moved less than this (relative to the radius) over a check interval; 0: never",
    )


class CertifySettings(StrictModel):
    """Certified upper bounds beside the search's found values (docs/theorem.md, "Brackets"):
    per image and level, U ≥ sup over the level's ball of ‖Ψ(y+e) − Ψ(y)‖, so the worst case
    lies in the bracket [found, U]. A threshold is then `proven` when U is below it."""

    intermediate: Literal["ibp", "crown"] = Field(
        default="ibp",
        description="The hidden units' bounds CROWN relaxes with: ibp (fast, loose behind a "
        "dense map or an ℓ2 ball) or crown (one backward pass per hidden unit; tight, costly)",
    )
    unproven: Literal["fail", "pass"] = Field(
        default="fail",
        description="The verdict of a threshold the search passes but the bound does not prove "
        "(found below it, U above): fail (the default: a pass must be a proof) or pass",
    )


class _WorstCaseKind(TaggedModel):
    kind: Literal["worst_case"] = "worst_case"


# The bases' order makes the fields' order (kind, threat model, search, then the check's own),
# which the request's JSON schema and its clients keep.
class WorstCaseCheck(WorstCaseSearch, WorstCaseThreatModel, _WorstCaseKind):
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Default: the audit's seed"
    )
    threshold: WorstCaseThreshold | None = None
    sampler: AveragingSettings | None = Field(default=None, description=SAMPLER_AVERAGING)
    certify: CertifySettings | None = Field(
        default=None,
        description="Certified upper bounds beside the search: per level the bracket "
        "[found, U] of the worst case, and the verdict `proven` when U is below the threshold "
        "(docs/theorem.md, 'Brackets'); null: no bounds",
    )

    @model_validator(mode="after")
    def _at_level_known(self) -> WorstCaseCheck:
        t = self.threshold
        if t is not None and t.at_level is not None and t.at_level not in self.levels:
            raise ValueError("threshold.at_level must be one of levels")
        return self

    @model_validator(mode="after")
    def _certifiable(self) -> WorstCaseCheck:
        if self.certify is None:
            return self
        if self.formulation != "ball":
            raise ValueError("certify needs formulation 'ball': a penalised search has no ball")
        t = self.threshold
        if self.space == "image" and t is not None and t.max_lipschitz is not None:
            raise ValueError(
                "certify with space 'image' cannot prove max_lipschitz (a ratio per unit of "
                "measurement perturbation); use space 'measurement' or max_relative_error"
            )
        return self

    def threat_model(self) -> WorstCaseThreatModel:
        return model_part(self, WorstCaseThreatModel)

    def search_settings(self) -> WorstCaseSearch:
        return model_part(self, WorstCaseSearch)


class RandomNoiseThreshold(RegressionBound):
    """at_level, when given, is one of the check's levels."""

    max_failure_probability: float = Field(
        gt=0.0, le=1.0, description="Bound on the upper end of the 95 % interval"
    )
    at_level: float | None = Field(default=None, gt=0.0, description="Default: the largest level")


class RandomNoiseCheck(TaggedModel):
    kind: Literal["random_noise"] = "random_noise"
    levels: Levels = Field(default_factory=lambda: [0.01, 0.02, 0.05])
    samples: int = Field(default=20, ge=1, le=100_000)
    failure_error: float = Field(
        default=0.2, gt=0.0, description="τ: a sample fails when its relative error exceeds it"
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    threshold: RandomNoiseThreshold | None = None

    _levels = field_validator("levels")(_check_levels)

    @model_validator(mode="after")
    def _at_level_known(self) -> RandomNoiseCheck:
        t = self.threshold
        if t is not None and t.at_level is not None and t.at_level not in self.levels:
            raise ValueError("threshold.at_level must be one of levels")
        return self


class LipschitzThreshold(RegressionBound):
    max_jacobian_norm: float = Field(gt=0.0)


class LipschitzCertifySettings(CertifySettings):
    """The lipschitz check's certified bounds (docs/theorem.md, "Brackets"): per image, U ≥ the
    largest Jacobian spectral norm ‖J_Ψ‖₂ anywhere on the ball ‖e‖ ≤ radius·‖y‖ around its
    measurement, hence a Lipschitz constant of Ψ on that ball; the norm at y lies in [found, U].
    A threshold is then `proven` when U is below it."""

    radius: float = Field(
        default=0.01,
        gt=0.0,
        le=10.0,
        description="The ball's radius relative to ‖y‖ over the measured entries, as "
        "worst_case's levels (ε = radius·‖y‖)",
    )


class LipschitzCheck(TaggedModel):
    kind: Literal["lipschitz"] = "lipschitz"
    iterations: int = Field(default=50, ge=1, le=10_000)
    tolerance: float = Field(
        default=1e-4,
        ge=0.0,
        description="After half the iterations, stop an image once the accuracy its residual "
        "proves is at most this (relative); a warning names images that end above it",
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    threshold: LipschitzThreshold | None = None
    sampler: AveragingSettings | None = Field(default=None, description=SAMPLER_AVERAGING)
    certify: LipschitzCertifySettings | None = Field(
        default=None,
        description="Certified upper bounds beside the measured norms: per image the bracket "
        "[found, U] of the largest Jacobian norm over a ball around its measurement, and the "
        "verdict `proven` when U is below the threshold (docs/theorem.md, 'Brackets'); "
        "null: no bounds",
    )


Check = Annotated[
    WorstCaseCheck
    | RandomNoiseCheck
    | LipschitzCheck
    | FalseNegativeCheck
    | FalsePositiveCheck
    | KernelCheck
    | MoreSamplesCheck
    | AdversarialCheck
    | MinimalPerturbationCheck
    | UniversalCheck,
    Field(discriminator="kind"),
]

CHECK_KINDS = (
    "worst_case",
    "random_noise",
    "lipschitz",
    *THEOREM_CHECK_KINDS,
    "adversarial",
    "minimal_perturbation",
    "universal",
)


class Baseline(StrictModel):
    """A stable reference reconstruction of the same operator, attacked with the same budget."""

    kind: Literal["tv", "wavelet"] = "tv"
    lambda_: float = Field(default=0.01, gt=0.0, alias="lambda")
    iterations: int = Field(default=50, ge=1, le=5000)
