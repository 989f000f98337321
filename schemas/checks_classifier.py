"""Checks of classifiers (`task: "classification"`) and the universal perturbation.

Epsilons of classifier checks are absolute norms in the model's input units (the spec's
`value_range`), as in the adversarial-robustness literature (ℓ∞ 8/255 on [0, 1] images).
Which checks fit which task is decided here, so that the gateway (422) and the engine
(EngineInputError) give the same reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from schemas.common import MAX_SEED, RegressionBound, StrictModel, TaggedModel, model_part

Norm = Literal["linf", "l2"]
# Each epsilon is a positive norm, at most 1e6 (stated per item, so the schema says it too);
# that they strictly increase is checked by `_check_epsilons` and stated in the description.
Epsilon = Annotated[float, Field(gt=0.0, le=1e6)]
Epsilons = Annotated[
    list[Epsilon],
    Field(
        min_length=1,
        max_length=32,
        description="Positive norms (at most 1e6) in the model's input units, strictly "
        "increasing (no repeats)",
    ),
]

# Checks a classifier audit can run; `random_noise` has a classifier form (accuracy per level).
CLASSIFIER_KINDS = ("adversarial", "minimal_perturbation", "universal", "random_noise")
# Checks that only make sense for a classifier (they need labels and logits).
CLASSIFIER_ONLY_KINDS = ("adversarial", "minimal_perturbation")
# Kinds that need the whole dataset in one shard (a train/held-out split of all images).
WHOLE_DATASET_KINDS = ("universal",)


def _check_epsilons(epsilons: list[float]) -> list[float]:
    if any(not (0.0 < eps <= 1e6) for eps in epsilons):
        raise ValueError("every epsilon is a positive norm in the model's input units")
    if sorted(epsilons) != epsilons or len(set(epsilons)) != len(epsilons):
        raise ValueError("epsilons must be strictly increasing")
    return epsilons


class AdversarialThreshold(RegressionBound):
    """at_epsilon, when given, is one of the check's epsilons."""

    min_robust_accuracy: float = Field(ge=0.0, le=1.0)
    at_epsilon: float | None = Field(default=None, gt=0.0, description="Default: the largest")


class AdversarialThreatModel(StrictModel):
    """The adversarial check's attacker: ‖δ‖ ≤ ε in `norm`, each of `epsilons`, inside the value
    range; it succeeds when the predicted class changes."""

    norm: Norm = "linf"
    epsilons: Epsilons = Field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255])

    _epsilons = field_validator("epsilons")(_check_epsilons)


class AdversarialSearch(StrictModel):
    """Which attack searches the ε-balls, and its budget."""

    attack: Literal["autoattack", "apgd", "pgd"] = Field(
        default="apgd",
        description="autoattack: the reference AutoAttack, standard version (pyautoattack); "
        "apgd / pgd: adv-lib's APGD (CE loss) and PGD",
    )
    steps: int = Field(default=100, ge=1, le=10_000, description="apgd and pgd only")
    restarts: int = Field(
        default=1, ge=1, le=64, description="apgd and pgd: random restarts (in the batch)"
    )


class _AdversarialKind(TaggedModel):
    kind: Literal["adversarial"] = "adversarial"


# The bases' order makes the fields' order: kind, threat model, search, the check's own.
class AdversarialCheck(AdversarialSearch, AdversarialThreatModel, _AdversarialKind):
    """Robust accuracy against a norm-bounded attacker, one level per ε."""

    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    threshold: AdversarialThreshold | None = None

    @model_validator(mode="after")
    def _at_epsilon_known(self) -> AdversarialCheck:
        t = self.threshold
        if t is not None and t.at_epsilon is not None and t.at_epsilon not in self.epsilons:
            raise ValueError("threshold.at_epsilon must be one of epsilons")
        return self

    def threat_model(self) -> AdversarialThreatModel:
        return model_part(self, AdversarialThreatModel)

    def search_settings(self) -> AdversarialSearch:
        return model_part(self, AdversarialSearch)


class MinimalPerturbationThreshold(RegressionBound):
    min_median_norm: float = Field(
        gt=0.0,
        description="Fail when the median norm is below it (inputs without an adversarial "
        "point found count as +∞)",
    )
    unmeasured_median: Literal["fail", "pass"] = Field(
        default="fail",
        description="The verdict when more than half of the inputs have no adversarial point "
        "found, so that the median is +∞: 'fail' (default) treats a failed search as no "
        "evidence of robustness; 'pass' accepts it (a model known to have no adversarial "
        "point inside its value range)",
    )


class MinimalPerturbationThreatModel(StrictModel):
    """An unbounded attacker inside the value range, measured in `norm`: the check reports the
    smallest perturbation that changes the predicted class."""

    norm: Norm = "l2"


class MinimalPerturbationSearch(StrictModel):
    """Which minimum-norm attack is tried first, and its iterations."""

    attack: Literal["fmn", "ddn", "deepfool"] = Field(
        default="fmn",
        description="The attack run first, on every input, with DeepFool over every class "
        "(ddn: also DDN targeted at the nearest estimated class); the smallest verified point "
        "is kept. The inputs where none finds anything go to the rest of FMN → DDN → DeepFool "
        "(cyclically; DDN for l2 only)",
    )
    steps: int = Field(default=100, ge=1, le=10_000, description="Iterations per attack")


class _MinimalPerturbationKind(TaggedModel):
    kind: Literal["minimal_perturbation"] = "minimal_perturbation"


class MinimalPerturbationCheck(
    MinimalPerturbationSearch, MinimalPerturbationThreatModel, _MinimalPerturbationKind
):
    """The smallest adversarial perturbation of every input (adv-lib's FMN, DDN, DeepFool).
    attack `ddn` takes norm `l2` only."""

    # where the report reads the accuracy curve off the norms found: no part of the attack
    epsilons: Epsilons | None = Field(
        default=None,
        description="Where to evaluate the implied accuracy-vs-ε curve; default: at every "
        "norm found",
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    threshold: MinimalPerturbationThreshold | None = None

    @field_validator("epsilons")
    @classmethod
    def _epsilons_sorted(cls, value: list[float] | None) -> list[float] | None:
        return None if value is None else _check_epsilons(value)

    @model_validator(mode="after")
    def _norm_supported(self) -> MinimalPerturbationCheck:
        if self.attack == "ddn" and self.norm != "l2":
            raise ValueError("attack 'ddn' minimises the l2 norm only")
        return self

    def threat_model(self) -> MinimalPerturbationThreatModel:
        return model_part(self, MinimalPerturbationThreatModel)

    def search_settings(self) -> MinimalPerturbationSearch:
        return model_part(self, MinimalPerturbationSearch)


class UniversalThreshold(RegressionBound):
    max_fooling_rate: float = Field(
        gt=0.0, le=1.0, description="Bound on the upper end of the 95 % interval"
    )


class UniversalThreatModel(StrictModel):
    """One perturbation u with ‖u‖ ≤ ε in `norm`, for all inputs at once, which the attacker
    computes on the `train_fraction` of the inputs it sees."""

    norm: Norm | None = Field(
        default=None, description="Default: linf for classifiers, l2 for reconstruction models"
    )
    epsilon: float = Field(default=8 / 255, gt=0.0, le=1e6)
    train_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)


class UniversalSearch(StrictModel):
    """The projected ascent that computes u: its steps and step size."""

    steps: int = Field(default=50, ge=1, le=10_000)
    step_size: float = Field(default=0.1, gt=0.0, le=10.0, description="Relative to ε")


class _UniversalKind(TaggedModel):
    kind: Literal["universal"] = "universal"


class UniversalCheck(UniversalSearch, UniversalThreatModel, _UniversalKind):
    """One perturbation u, ‖u‖ ≤ ε, computed on a training split and evaluated on the rest.

    Classifiers: ε is an absolute norm of an image perturbation; an input is fooled when its
    predicted class changes. Reconstruction models: ε is relative, ‖u‖ ≤ ε·mean‖y‖ over the
    training split, in measurement space (`l2` only); an input counts only when its relative
    error without u is at most `failure_error`, and is fooled when u takes it above."""

    # the failure criterion τ of reconstructions, as random_noise's
    failure_error: float = Field(
        default=0.2, gt=0.0, description="Reconstruction models: τ on the relative error"
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    threshold: UniversalThreshold | None = None

    def threat_model(self) -> UniversalThreatModel:
        return model_part(self, UniversalThreatModel)

    def search_settings(self) -> UniversalSearch:
        return model_part(self, UniversalSearch)


def task_problems(
    task: str,
    kinds: Sequence[str],
    has_operator: bool,
    has_baseline: bool,
) -> list[str]:
    """Why an audit's checks do not fit the model's task (empty when they do)."""
    problems: list[str] = []
    if task == "classification":
        unfit = [kind for kind in kinds if kind not in CLASSIFIER_KINDS]
        if unfit:
            problems.append(
                f"check(s) {', '.join(sorted(set(unfit)))} audit reconstruction models; "
                f"a classifier accepts {', '.join(CLASSIFIER_KINDS)}"
            )
        if has_baseline:
            problems.append("a baseline is a reconstruction method; leave it out for a classifier")
    else:
        unfit = [kind for kind in kinds if kind in CLASSIFIER_ONLY_KINDS]
        if unfit:
            problems.append(
                f"check(s) {', '.join(sorted(set(unfit)))} audit classifiers; "
                f"the model's task is {task!r}"
            )
        if not has_operator:
            problems.append("a reconstruction audit needs an operator (the forward model A)")
    return problems
