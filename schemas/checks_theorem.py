"""The checks that turn the universal instability theorem into audit results (docs/theorem.md):
false negatives, false positives, the kernel (hallucinations and certificates), more samples.

Each is one member of the `Check` union of schemas/checks.py, keyed by `kind`."""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from schemas.common import MAX_SEED, RegressionBound, StrictModel, TaggedModel, model_part
from schemas.sampler import DrawSettings, HallucinationSettings

LESION_SHAPES = ("disk", "square", "random_walk", "text")


class Lesion(StrictModel):
    """A small detail inserted into the image: `size` is the disk's radius, the square's side,
    the random walk's pixel count, or the text's height, in pixels; `contrast` is the lesion's
    value relative to the spec's value range (hi − lo), of either sign, never 0. `text` (shape
    `text`) is printable characters only."""

    shape: Literal["disk", "square", "random_walk", "text"] = "disk"
    size: int = Field(default=2, ge=1, le=256)
    contrast: float = Field(default=0.1, ge=-1.0, le=1.0)
    text: str = Field(
        default="A", min_length=1, max_length=8, description="The string of shape 'text'"
    )

    @model_validator(mode="after")
    def _visible(self) -> Lesion:
        if self.contrast == 0:
            raise ValueError("contrast: a lesion of contrast 0 is not there")
        if self.shape == "text" and not self.text.isprintable():
            raise ValueError("text: printable characters only")
        return self


class Position(StrictModel):
    """The lesion's top-left corner (row, column) in pixels."""

    row: int = Field(ge=0, le=4096)
    col: int = Field(ge=0, le=4096)


class MissRateThreshold(RegressionBound):
    max_miss_rate: float = Field(ge=0.0, le=1.0)


class FalseNegativeCheck(TaggedModel):
    """Is a small lesion recovered? ρ = ⟨Ψ(A(x+z)+e) − Ψ(Ax+e), z⟩ / ‖z‖², held against what
    the data carries, ρ_A⁺ (the recovery of the data-consistent reference A⁺): missed when
    ρ < relative_threshold · ρ_A⁺; placements with ρ_A⁺ < min_visible_fraction are
    unrecoverable and not judged (FNAF, Cheng et al. 2020; the theorem's part (b))."""

    kind: Literal["false_negative"] = "false_negative"
    lesion: Lesion = Field(default_factory=Lesion)
    search: Literal["random", "adversarial", "noise"] = "random"
    placements: int = Field(default=8, ge=1, le=1024, description="Random placements per image")
    positions: list[Position] | None = Field(
        default=None, max_length=1024, description="Explicit placements instead of random ones"
    )
    relative_threshold: float = Field(
        default=0.8,
        gt=0.0,
        le=1.0,
        description="Missed when ρ < relative_threshold · ρ_A⁺: the share of A⁺'s recovery "
        "the network must keep",
    )
    min_visible_fraction: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Placements whose ρ_A⁺ (the share of the lesion the data carries) is below "
        "it are unrecoverable: not judged",
    )
    recovery_threshold: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Deprecated, the former name of relative_threshold: read as "
        "relative_threshold when that is not given (the same rule where the data carries the "
        "whole lesion, ρ_A⁺ = 1)",
    )
    # search = "adversarial"
    steps: int = Field(default=20, ge=1, le=10_000)
    step_size: float = Field(default=0.1, gt=0.0, le=1.0, description="Relative to the bound")
    measurement_delta: float = Field(
        default=0.0, ge=0.0, le=10.0, description="δ of a joint perturbation ‖e‖ ≤ δ‖y‖; 0: none"
    )
    # search = "noise"
    noise_samples: int = Field(default=20, ge=1, le=100_000)
    noise_level: float = Field(default=0.02, gt=0.0, le=10.0, description="‖e‖ = level·‖y‖")
    panels: int = Field(default=3, ge=0, le=32, description="Image panels of the worst misses")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    threshold: MissRateThreshold | None = None
    sampler: DrawSettings | None = Field(
        default=None,
        description="For a stochastic model: each placement is judged on `samples` single "
        "draws against the R-draw average without the lesion, a miss rate over the sampler "
        "(docs/theorem.md, 'Auditing a sampler'); null: the defaults; ignored for a "
        "deterministic model",
    )

    @model_validator(mode="before")
    @classmethod
    def _former_threshold_name(cls, data: Any) -> Any:
        """Requests written before relative_threshold keep validating: their
        recovery_threshold becomes the relative threshold."""
        if not isinstance(data, dict) or data.get("recovery_threshold") is None:
            return data
        if data.get("relative_threshold") is None:
            return {**data, "relative_threshold": data["recovery_threshold"]}
        if data["relative_threshold"] != data["recovery_threshold"]:
            raise ValueError(
                "recovery_threshold is the former name of relative_threshold: give one of them"
            )
        return data


class SpuriousContrastThreshold(RegressionBound):
    """At least one bound. max_hallucination_probability judges a stochastic model only (a
    deterministic model has no hallucination probability: that bound is not compared)."""

    max_spurious_contrast: float | None = Field(default=None, gt=0.0)
    max_hallucination_probability: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Bound on the upper end of the 95 % interval of the hallucination "
        "probability under the found perturbation (stochastic models)",
    )

    @model_validator(mode="after")
    def _some_bound(self) -> SpuriousContrastThreshold:
        if self.max_spurious_contrast is None and self.max_hallucination_probability is None:
            raise ValueError("give max_spurious_contrast and/or max_hallucination_probability")
        return self


class FalsePositiveThreatModel(StrictModel):
    """Measurement perturbations ‖e‖ ≤ δ‖y‖ that maximise the change of the reconstruction
    inside the flattest `window`×`window` square of the image."""

    delta: float = Field(default=0.02, gt=0.0, le=10.0)
    window: int = Field(default=5, ge=1, le=256, description="Side of the square window")


class FalsePositiveSearch(StrictModel):
    """The worst-case search's (pgd's) budget and first step."""

    steps: int = Field(default=30, ge=1, le=10_000)
    restarts: int = Field(default=1, ge=1, le=64)
    step_size: float | None = Field(
        default=None,
        gt=0.0,
        le=10.0,
        description="First step of the pgd ascent, relative to the radius; default 2.0",
    )


class _FalsePositiveKind(TaggedModel):
    kind: Literal["false_positive"] = "false_positive"


# The bases' order makes the fields' order: kind, threat model, search, the check's own.
class FalsePositiveCheck(FalsePositiveSearch, FalsePositiveThreatModel, _FalsePositiveKind):
    """Can a small measurement perturbation ‖e‖ ≤ δ‖y‖ paint a detail into a window where the
    image has none? Maximises ‖W(Ψ(y+e) − Ψ(y))‖² with the worst-case search."""

    panels: int = Field(default=3, ge=0, le=32)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    threshold: SpuriousContrastThreshold | None = None
    sampler: HallucinationSettings | None = Field(
        default=None,
        description="For a stochastic model: the average map's search, and the hallucination "
        "probability over `samples` single draws (docs/theorem.md, 'Auditing a sampler'); "
        "null: the defaults; ignored for a deterministic model",
    )

    def threat_model(self) -> FalsePositiveThreatModel:
        return model_part(self, FalsePositiveThreatModel)

    def search_settings(self) -> FalsePositiveSearch:
        return model_part(self, FalsePositiveSearch)


class CertifiedLipschitzThreshold(RegressionBound):
    max_certified_lipschitz: float = Field(gt=0.0)


class KernelCheck(TaggedModel):
    """(a) Hallucination: a detail's null-space component z = d − A⁺A d; x and x+z have the same
    measurements. (b) Certificates: pairs meeting the theorem's conditions, each a proven lower
    bound on the local Lipschitz constant, then confirmed by the worst-case search.

    The pair search compares every image with every other, so the check runs as one shard over
    the whole audit set (WHOLE_SET_THEOREM_KINDS)."""

    kind: Literal["kernel"] = "kernel"
    detail: Lesion = Field(default_factory=lambda: Lesion(shape="disk", size=2, contrast=0.2))
    neighbours: int = Field(
        default=4, ge=0, le=64, description="Nearest audit images per image, in measurement space"
    )
    directions: int = Field(
        default=4, ge=0, le=64, description="Smallest singular directions of A for built pairs"
    )
    scales: list[Annotated[float, Field(gt=0.0, le=100.0)]] = Field(
        default_factory=lambda: [0.05, 0.2, 1.0],
        min_length=1,
        max_length=16,
        description="‖v‖ of a built pair x' = x + v, relative to ‖x‖; each in (0, 100]",
    )
    power_iterations: int = Field(
        default=100, ge=1, le=100_000, description="Block power iterations (images over 1024 px)"
    )
    cg_iterations: int = Field(default=200, ge=1, le=100_000)
    confirm: int = Field(
        default=3, ge=0, le=64, description="Certificates checked by the worst-case search"
    )
    steps: int = Field(default=40, ge=1, le=10_000, description="Worst-case search steps")
    restarts: int = Field(default=2, ge=1, le=64)
    panels: int = Field(default=2, ge=0, le=32)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    threshold: CertifiedLipschitzThreshold | None = None

    @model_validator(mode="after")
    def _positive_scales(self) -> KernelCheck:
        if any(not (0.0 < s <= 100.0) for s in self.scales):
            raise ValueError("scales: every scale is in (0, 100]")
        return self


class MoreSamplesThreshold(RegressionBound):
    max_psnr_drop: float = Field(
        ge=0.0, description="dB the mean PSNR may fall between two levels as samples rise"
    )


class MoreSamplesCheck(TaggedModel):
    """Reconstruction quality as the sampling grows (Invfool's test 3): MRI accelerations in
    decreasing order, or CT angle counts in increasing order. Give exactly one of
    `accelerations` (the audit's operator is `mri`) and `angles` (its operator is `radon`);
    neither or both is a 422. The list that does not fit the operator is refused by the worker
    (the audit fails, `invalid-audit-input`), not at submission."""

    kind: Literal["more_samples"] = "more_samples"
    accelerations: list[Annotated[float, Field(ge=1.0, le=64.0)]] | None = Field(
        default=None,
        min_length=2,
        max_length=16,
        description="MRI accelerations in [1, 64], strictly decreasing (samples rise); "
        "exactly one of accelerations and angles",
    )
    angles: list[Annotated[int, Field(ge=1, le=1024)]] | None = Field(
        default=None,
        min_length=2,
        max_length=16,
        description="CT angle counts in [1, 1024], strictly increasing; exactly one of "
        "accelerations and angles",
    )
    tolerance: float = Field(
        default=0.05, ge=0.0, description="dB of PSNR fall ignored by `monotone`"
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    threshold: MoreSamplesThreshold | None = None

    @model_validator(mode="after")
    def _one_sampling_list(self) -> MoreSamplesCheck:
        if (self.accelerations is None) == (self.angles is None):
            raise ValueError("give exactly one of accelerations (mri) and angles (radon)")
        if self.accelerations is not None:
            a = self.accelerations
            if any(not (1.0 <= v <= 64.0) for v in a) or any(p <= q for p, q in pairwise(a)):
                raise ValueError(
                    "accelerations: strictly decreasing values in [1, 64] (samples rise)"
                )
        if self.angles is not None:
            n = self.angles
            if any(not (1 <= v <= 1024) for v in n) or any(p >= q for p, q in pairwise(n)):
                raise ValueError("angles: strictly increasing counts in [1, 1024]")
        return self


THEOREM_CHECK_KINDS = ("false_negative", "false_positive", "kernel", "more_samples")
# Kinds that run as one shard over all images (workers.engine.shards).
WHOLE_SET_THEOREM_KINDS = ("kernel",)


def sampling_operator_problem(check: MoreSamplesCheck, operator_kind: str | None) -> str | None:
    """Why `check` cannot vary the audit's operator (None when it can): accelerations vary an
    `mri` operator, angles a `radon` one. The request's validation and the engine share it."""
    if check.accelerations is not None and operator_kind != "mri":
        return f"more_samples: accelerations apply to the mri operator, not {operator_kind!r}"
    if check.angles is not None and operator_kind != "radon":
        return f"more_samples: angles apply to the radon operator, not {operator_kind!r}"
    return None
