"""The audit report (`report.json`). Check results are plain JSON objects whose fields per `kind`
are documented in docs/reports.md; the envelope and the threshold comparisons every check
result carries are typed here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.audits import Verdict

SCHEMA_VERSION = "1.0"

# A check's verdict: the audit's, plus `proven` (a pass whose threshold certified upper bounds
# prove: worst_case or lipschitz with `certify`), which counts as a pass wherever verdicts
# are read.
CheckVerdict = Literal["pass", "proven", "fail", "info", "error"]

Subject = Literal["model", "reference", "baseline"]


class Cost(BaseModel):
    wall_seconds: float
    forward_passes: int
    backward_passes: int


class NoiseFloor(BaseModel):
    """A stochastic model's output spread at fixed inputs (docs/reports.md, "Stochastic
    models"): the root-mean-square distance of one draw from the average output."""

    value: float | None = Field(
        description="√(mean over the inputs y of E‖Ψ(y) − EΨ(y)‖²), the norm over the whole "
        "output (σ√n for Ψ(y) = By + σξ with n output values); null when a draw is not finite"
    )
    ci_low: float | None
    ci_high: float | None = Field(
        description="With ci_low: the `confidence` interval (Student-t on the mean of "
        "‖Ψ₁(y) − Ψ₂(y)‖²/2 over pairs of independent calls, ends square-rooted)"
    )
    confidence: float
    draws_per_input: int = Field(description="Calls at each input, one input per call")
    inputs: int = Field(description="Measurements of the audit's first images it was taken at")
    definition: str = Field(description="The above, in words")


Direction = Literal["at_most", "at_least"]


class ThresholdComparison(BaseModel):
    """One bound of a check's threshold against the value the check measured. `passed` is the
    check's own reading: `measured <= bound` (`at_most`) or `measured >= bound` (`at_least`);
    a missing (`null`) measurement does not pass unless the threshold says so
    (minimal_perturbation's `unmeasured_median: "pass"`)."""

    quantity: str = Field(description="What was measured, in words (unique within the check)")
    measured: float | None
    bound: float
    direction: Direction
    passed: bool
    estimate: float | None = Field(
        default=None,
        description="Only for an estimated figure of a stochastic model (a mean over fresh "
        "averages): the point estimate; `measured` is then the upper end of its 95 % interval "
        "(docs/theorem.md, 'Verdicts on estimated figures')",
    )
    standard_error: float | None = Field(
        default=None, description="With `estimate`: its standard error over the replicates"
    )


class ModelIdentity(BaseModel):
    id: str | None = None
    name: str
    sha256: str
    format: str
    spec: dict[str, Any]
    stochastic: bool | None = Field(
        default=None,
        description="The model's: two calls at the admission probe's input differ by more than "
        "the tolerance (docs/models.md, 'Stochastic models'); absent when not measured",
    )
    output_spread: float | None = Field(
        default=None,
        description="Only for a stochastic model: the largest ‖Ψ₁(y) − Ψ₂(y)‖ / ‖Ψ₁(y)‖ over "
        "the probe's inputs, Ψ₂ the first call that differs from the first (null: the two "
        "outputs differ in shape or are not finite)",
    )
    noise_floor: NoiseFloor | None = Field(
        default=None,
        description="Only for a stochastic model audited for reconstruction: its output's "
        "spread at fixed inputs, with an interval",
    )
    comparisons: list[ThresholdComparison] | None = Field(
        default=None,
        description="Only with the config's `sampler_threshold` and a stochastic model: its "
        "bounds against the model's own figures (`max_noise_floor` against the upper end of "
        "the noise floor's interval); a failed one fails the audit",
    )


class CheckResult(BaseModel):
    kind: str
    subject: Subject
    verdict: CheckVerdict = Field(
        description="pass, fail or info as its comparisons decide; `proven`: every comparison "
        "passed and certified upper bounds prove the threshold (a pass)"
    )
    comparisons: list[ThresholdComparison] = Field(
        default_factory=list,
        description="The threshold's comparisons; the verdict is computed from them alone",
    )
    warnings: list[str] = Field(default_factory=list)
    artifacts: list[str] = Field(default_factory=list)
    model_config = {"extra": "allow"}


class RegressionComparison(BaseModel):
    """One figure of the model against the same figure of the reference model
    (schemas.verdicts.compare_regression)."""

    quantity: str
    level: float | None = Field(description="The level (or ε) of the figure; null for none")
    direction: Direction = Field(description="The figure's good side: at_most = lower is better")
    model: float | None
    reference: float | None
    difference: float | None = Field(description="model − reference")
    regression: float | None = Field(
        description="(model − reference)/|reference| in the worse direction; negative: better"
    )
    max_regression: float
    passed: bool


class CheckComparison(BaseModel):
    index: int = Field(description="Position of the check in the config's `checks`")
    kind: str
    max_regression: float
    figures: list[RegressionComparison]
    verdict: Verdict


class Comparison(BaseModel):
    reference: ModelIdentity = Field(description="The model compared with (`compare_with`)")
    checks: list[CheckComparison]
    verdict: Verdict = Field(description="`fail` when any figure regressed beyond its bound")


class Report(BaseModel):
    schema_version: str = SCHEMA_VERSION
    audit_id: str | None = None
    verdict: Verdict
    model: ModelIdentity
    config: dict[str, Any]
    environment: dict[str, Any]
    seed: int
    cost: Cost
    checks: list[CheckResult]
    warnings: list[str] = Field(
        default_factory=list, description="Audit-wide warnings (e.g. a baseline skipped)"
    )
    comparison: Comparison | None = Field(
        default=None, description="Only with compare_with: the model against the reference"
    )
    signature: dict[str, str] | None = None
