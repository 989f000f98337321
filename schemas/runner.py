"""The protocol between a Celery task and its sandboxed runner child (`python -m workers.runner`).

The task writes `job.json` into a fresh job directory, starts the child with that directory as
its only writable place, and reads JSON lines (`RunnerEvent`) from the child's stdout.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.audits import AuditConfig
from schemas.model_spec import ModelFormat, ModelSpec

JOB_FILE = "job.json"
SHARDS_DIR = "shards"  # finished shard results: shards/<shard_id>.json (inputs and outputs)
OUT_DIR = "out"  # report.json and artifacts written by the runner


class RunnerJob(BaseModel):
    kind: Literal["admit", "audit"]
    model_file: str = Field(description="Path relative to the job directory")
    model_format: ModelFormat
    model_sha256: str
    spec: ModelSpec
    audit_id: str | None = None
    model_id: str | None = None
    # dataset and array references are rewritten to {"file": <relative path>} in the job directory
    config: AuditConfig | None = None


class RunnerEvent(BaseModel):
    event: Literal["progress", "shard", "admitted", "rejected", "report", "error", "log"]
    fraction: float | None = None
    check: str | None = None
    message: str | None = None
    shard_id: str | None = None
    file: str | None = None
    reason: str | None = None
    info: dict[str, Any] | None = None
