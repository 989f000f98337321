"""The audit report (`report.json`). Check results are plain JSON objects whose fields per `kind`
are documented in docs/report.md; the envelope is typed here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.audits import Verdict

SCHEMA_VERSION = "1.0"

Subject = Literal["model", "baseline"]


class Cost(BaseModel):
    wall_seconds: float
    forward_passes: int
    backward_passes: int


class ModelIdentity(BaseModel):
    id: str | None = None
    name: str
    sha256: str
    format: str
    spec: dict[str, Any]


class CheckResult(BaseModel):
    kind: str
    subject: Subject
    verdict: Verdict
    warnings: list[str] = Field(default_factory=list)
    artifacts: list[str] = Field(default_factory=list)
    model_config = {"extra": "allow"}


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
    signature: dict[str, str] | None = None
