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


class EndpointIdentity(BaseModel):
    """An endpoint model's endpoint (docs/models.md, "Endpoint models"); never its secret."""

    url: str = Field(description="The inference endpoint's base URL")
    model_name: str = Field(description="The model's name at the endpoint")
    model_version: str | None = Field(
        default=None, description="The model's version at the endpoint; null: its default"
    )


class ModelIdentity(BaseModel):
    id: str | None = None
    name: str
    sha256: str = Field(
        description="The model file's sha256; an endpoint model's: the hash of its URL, name, "
        "version and tensor names"
    )
    format: str = Field(description="The uploaded file's format, or `endpoint`")
    spec: dict[str, Any]
    endpoint: EndpointIdentity | None = Field(
        default=None,
        description="Only for an endpoint model (`format: endpoint`), audited by queries alone: "
        "where it was queried",
    )
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


class QueryCounts(BaseModel):
    """What the queries of one check at one level cost (workers/shared/query_ledger.py)."""

    check: str = Field(description="The check's kind, or `probe` for the admission probe")
    level: float | None = Field(description="The level δ; null where the check has none")
    sent: int = Field(description="Inputs sent, every attempt counted (retries included)")
    answered: int = Field(description="Inputs the endpoint answered with a valid output")
    requests: int
    failures: int = Field(description="Attempts that failed (HTTP error, time-out, bad answer)")
    retries: int = Field(description="Attempts after a failure")


class QueryImageCount(BaseModel):
    check: str
    level: float | None
    image: int = Field(description="The audited image's index")
    answered: int


class QueryLatency(BaseModel):
    p50: float | None = Field(description="Median latency of an answered request, seconds")
    p99: float | None
    max: float | None


class ShardQueries(BaseModel):
    shard: str = Field(description="The shard's id")
    check: str = Field(description="Its check's kind")
    images: list[int] = Field(description="The audited images (indices) its result covers")
    sent: int
    answered: int
    failures: int


class Queries(BaseModel):
    """An endpoint model's query ledger, merged over the audit's shards (docs/reports.md,
    "Queries of an endpoint audit")."""

    query_only: bool = Field(description="True: the model was audited by queries alone")
    budget: int | None = Field(description="The most inputs the audit could send")
    sent: int = Field(description="Inputs sent, retries included: what the budget caps")
    answered: int
    requests: int
    failures: int
    retries: int
    latency_seconds: QueryLatency
    by_check: list[QueryCounts] = Field(description="Per check and level")
    by_image: list[QueryImageCount] = Field(description="Answered inputs per check, level, image")
    failures_by_cause: dict[str, int] = Field(
        description="Failed attempts per cause (`http 503`, `timeout`, `connection`, ...)"
    )
    drawn: int | None = Field(
        default=None,
        description="How much of the budget the audit's steps drew in all (at least `sent`: "
        "the difference is what attempts lost with a worker sent, or drew and never sent)",
    )
    by_shard: list[ShardQueries] = Field(
        default_factory=list, description="Per stored shard: its check, images and queries"
    )


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
    queries: Queries | None = Field(
        default=None,
        description="Only for an endpoint model: what its queries cost (absent for uploads)",
    )
    signature: dict[str, str] | None = None
