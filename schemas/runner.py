"""The protocol between a Celery task and its sandboxed runner child
(`python -m workers.sandbox.runner`).

The task writes its request (`RunnerRequest`) as `job.json` into a fresh job directory, starts
the child with that directory as its only writable place, and reads JSON lines (`RunnerEvent`)
from the child's stdout.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.archive_rules import ArchiveLimits
from schemas.audits import AuditConfig
from schemas.comparisons import ReferenceModel
from schemas.model_spec import ModelFormat, ModelSpec

# What a job's model is: an uploaded file's format, or `endpoint` (schemas.endpoints: the
# model answers queries relayed by the worker; its "file" holds the endpoint's identity).
JobModelFormat = ModelFormat | Literal["endpoint"]
# The event a runner sends for one batch of endpoint queries (workers.engine.relay_client).
QUERY_EVENT = "query"

JOB_FILE = "job.json"
SHARDS_DIR = "shards"  # finished shard results: shards/<shard_id>.json (inputs and outputs)
# An endpoint model's relayed queries: queries/<n>.in.npy (the runner's batch) and
# queries/<n>.out.npy (the endpoint's answers, written by the worker)
QUERIES_DIR = "queries"
OUT_DIR = "out"  # report.json and artifacts written by the runner
PLAN_FILE = "plan.json"  # out/plan.json: the shards a `plan` job found (RunnerPlan)
STOP_FILE = "STOP"  # created by the worker to ask a running child to stop (cooperatively)
MAX_SHARDS = 10_000  # an audit planned into more shards is refused: raise images_per_shard
# While an audit or shards job runs, the runner writes a `beat` event this often, except while
# one call of the model has been running since the last beat without returning: the worker's
# watchdog (workers.sandbox.child) stops a shard that stays silent too long.
BEAT_SECONDS = 1.0
# Inputs of each call of the admission probe (workers.engine.probe): the worker's watchdog
# divides the probe's timed calls by it (workers.execution.watchdog).
PROBE_BATCH = 2


class PlannedShard(BaseModel):
    shard_id: str
    check_index: int
    kind: str
    subject: str
    start: int
    stop: int


class RunnerPlan(BaseModel):
    shards: list[PlannedShard]


class RunnerRequest(BaseModel):
    """What a task asks of its runner child (job.json in the job directory): `admit` a model;
    `plan` an audit (out/plan.json); run the `shards` named in shard_ids (each result to
    shards/); or `audit`: run what is not in shards/ yet, merge, write the report (the
    finalising step, once every shard is stored)."""

    kind: Literal["admit", "audit", "plan", "shards"]
    model_file: str = Field(description="Path relative to the job directory")
    model_format: JobModelFormat
    model_sha256: str
    spec: ModelSpec
    audit_id: str | None = None
    model_id: str | None = None
    # dataset and array references are rewritten to {"file": <relative path>} in the job directory
    config: AuditConfig | None = None
    shard_ids: list[str] | None = None  # kind `shards`: the shards to run
    # the gateway's limits (its settings), which the engine holds archives to
    # (schemas.archive_rules); a job.json without them gets the defaults
    archive_limits: ArchiveLimits = Field(default_factory=ArchiveLimits)
    # compare_with: the reference model, its file relative to the job directory
    reference: ReferenceModel | None = None


class RunnerEvent(BaseModel):
    event: Literal[
        "progress",
        "shard",
        "admitted",
        "rejected",
        "report",
        "plan",
        "done",
        "error",
        "beat",
        "query",
    ]
    fraction: float | None = None
    check: str | None = None
    message: str | None = None
    shard_id: str | None = None
    file: str | None = None
    reason: str | None = None
    info: dict[str, Any] | None = None
