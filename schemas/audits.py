"""Audit requests, their status and their listing."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, Field, model_validator

from schemas.checks import Baseline, Check
from schemas.checks_theorem import MoreSamplesCheck, sampling_operator_problem
from schemas.common import FileArray, StrictModel
from schemas.datasets import DatasetRef, FileDataset
from schemas.operators import Operator
from schemas.problem import Problem
from schemas.sampler import SamplerThreshold

AuditState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
AuditPriority = Literal["low", "normal", "high"]
TERMINAL_STATES: tuple[AuditState, ...] = ("succeeded", "failed", "cancelled")
Verdict = Literal["pass", "fail", "info", "error"]


class Budget(StrictModel):
    wall_seconds: float | None = Field(
        default=None, gt=0.0, le=7 * 24 * 3600, description="Time limit for the whole audit"
    )
    images_per_shard: int = Field(
        default=16, ge=1, le=4096, description="Images per unit of work stored as it finishes"
    )
    queries: int | None = Field(
        default=None,
        ge=1,
        le=10**9,
        description="An endpoint model's audit: the most inputs its workers may send to the "
        "endpoint, retries included (default: the service's `endpoint_query_budget`; at most "
        "the tenant's cap). Ignored for uploaded models",
    )


class AuditConfig(StrictModel):
    """Everything an audit needs besides the model: the local CLI's `audit.json`."""

    dataset: DatasetRef
    operator: Operator | None = Field(
        default=None,
        description="The forward operator A; required for reconstruction models, left out for "
        "classifiers (which see images: the engine uses the identity)",
    )
    noise_level: float = Field(
        default=0.0,
        ge=0.0,
        le=10.0,
        description="Relative Gaussian noise on the clean measurements",
    )
    checks: list[Check] = Field(min_length=1, max_length=32)
    baseline: Baseline | None = None
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    budget: Budget = Field(default_factory=Budget)
    callback_url: AnyHttpUrl | None = None
    sampler_threshold: SamplerThreshold | None = Field(
        default=None,
        description="Bounds on a stochastic model's own figures (the report's `model."
        "noise_floor`), judged with the checks' verdicts; not compared for a deterministic "
        "model (docs/theorem.md, 'Auditing a sampler')",
    )

    @model_validator(mode="after")
    def _checks_fit_the_operator(self) -> AuditConfig:
        operator_kind = getattr(self.operator, "kind", None)
        for check in self.checks:
            if isinstance(check, MoreSamplesCheck):
                problem = sampling_operator_problem(check, operator_kind)
                if problem is not None:
                    raise ValueError(problem)
        return self

    def file_references(self) -> list[str]:
        """Local paths named anywhere in the config (the service refuses them)."""
        found: list[str] = []
        if isinstance(self.dataset, FileDataset):
            found.append(self.dataset.file)
        for value in (self.operator.__dict__ if self.operator is not None else {}).values():
            if isinstance(value, FileArray):
                found.append(value.file)
        return found


# Optional fields added after configs were first stored and signed: left out of a dump where
# null, so configs and request hashes read as they did before each existed.
_LATER_CHECK_FIELDS = ("sampler", "certify")
_LATER_THRESHOLD_FIELDS = ("max_regression", "max_hallucination_probability")
_LATER_CONFIG_FIELDS = ("sampler_threshold",)


def strip_unset_regressions(dumped: dict[str, Any]) -> dict[str, Any]:
    """A dumped config without the `max_regression: null` of each check's threshold (and the
    other later fields above while null), so configs and request hashes read as they did before
    comparisons (and samplers' settings) existed."""
    _drop_nulls(dumped, _LATER_CONFIG_FIELDS)
    for check in dumped.get("checks", []):
        if not isinstance(check, dict):
            continue
        _drop_nulls(check, _LATER_CHECK_FIELDS)
        threshold = check.get("threshold")
        if isinstance(threshold, dict):
            _drop_nulls(threshold, _LATER_THRESHOLD_FIELDS)
    return dumped


def _drop_nulls(part: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if name in part and part[name] is None:
            del part[name]


class CompareWith(StrictModel):
    """The model the audited model is compared with (its released version): another ready
    model of the same tenant with the same task, input, image shape, classes and value range.
    Both are audited on the same images, perturbation draws and seeds (docs/reports.md)."""

    model_id: str = Field(min_length=1, max_length=64)


class AuditRequest(AuditConfig):
    """Body of `POST /v1/audits`."""

    model_id: str = Field(min_length=1, max_length=64)
    compare_with: CompareWith | None = Field(
        default=None,
        description="Audit this model too, on the same inputs and seeds, and fail the audit "
        "where the audited model is worse than it by more than each check's "
        "threshold.max_regression (the report's `comparison`)",
    )
    priority: AuditPriority = Field(
        default="normal",
        description="Orders the audit's tasks on the broker (a worker takes `high` before "
        "`normal` before `low`) and, between the tenant's own audits, which waiting shard runs "
        "first; other tenants' audits keep their fair share",
    )


class Progress(BaseModel):
    fraction: float = Field(ge=0.0, le=1.0)
    current_check: str | None = None
    message: str | None = None


class AuditLinks(BaseModel):
    self: str
    report: str | None = None
    cancel: str | None = None


class ShardProgress(BaseModel):
    done: int = Field(ge=0, description="Shards of the audit finished")
    total: int = Field(
        ge=0, description="Shards the audit was planned into; 0 until a worker has planned it"
    )


class CheckProgress(BaseModel):
    index: int = Field(ge=0, description="Position of the check in the request's `checks`")
    kind: str
    shards_done: int = Field(ge=0)
    shards_total: int = Field(ge=0)
    finished: bool = Field(description="Every shard of the check is done")


class AuditStatus(BaseModel):
    id: str
    model_id: str
    status: AuditState
    progress: Progress
    verdict: Verdict | None = None
    error: Problem | None = None
    attempts: int = Field(
        default=0,
        ge=0,
        description="The most tries any step of the audit a worker runs (planning, "
        "finalising) has needed so far: 0 until a worker takes it, 1 unless a step was retried "
        "(its worker or runner was killed); it never decreases",
    )
    cancel_requested: bool = Field(
        default=False,
        description="A cancel was asked for: true from the cancel's own answer on. A queued "
        "audit is `cancelled` at once; a running one stops at its workers' next checkpoint "
        "and then becomes `cancelled` (or ends as it was about to, if it was finishing)",
    )
    priority: str = Field(default="normal", description="low | normal | high")
    shards: ShardProgress
    checks: list[CheckProgress] | None = Field(
        default=None,
        description="Progress of each check, by shards; only in `GET /v1/audits/{id}` of a "
        "planned audit (not in lists or callbacks)",
    )
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    links: AuditLinks


class AuditList(BaseModel):
    items: list[AuditStatus]
    next_page_token: str | None = None
