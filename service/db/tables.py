"""Tables. The database is the source of truth; Redis only carries messages."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes on SQLite too (it stores naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("tnt"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), index=True)
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class ConsoleSession(Base):
    """A browser signed in to the web console (service/api/console): the sha256 of the random
    token its cookie holds (never the token), and the API key it signed in with, whose tenant it
    sees. Revoking that key ends the session at once; signing out deletes the row."""

    __tablename__ = "console_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("mdl"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="validating", index=True)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    admission_info: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # An endpoint model (format "endpoint", migration 0009): where it answers and the limits
    # (schemas.endpoints.EndpointRegistration.public), and its auth secret, encrypted
    # (service.signing.endpoint_secrets); both null for an uploaded model.
    endpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    endpoint_secret: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    shape: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"images": [N,C,H,W], "arrays": {...}}
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Audit(Base):
    __tablename__ = "audits"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_audit_idempotency"),
        # GET /v1/audits: a tenant's audits newest first (keyset pagination) is one index seek,
        # filtered by status or by model too (migrations 0002, 0006).
        Index("ix_audits_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_audits_tenant_status_created", "tenant_id", "status", "created_at", "id"),
        Index("ix_audits_tenant_model_created", "tenant_id", "model_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("aud"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    request: Mapped[dict[str, Any]]  # canonical AuditRequest, defaults filled in
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)

    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    progress_check: Mapped[str | None] = mapped_column(String(64), default=None)
    progress_message: Mapped[str | None] = mapped_column(Text, default=None)
    verdict: Mapped[str | None] = mapped_column(String(16), default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    # Leasing: the task that owns the audit renews lease_expires_at with each heartbeat.
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # `attempts` counts the tries of the step the audit is in: planning, then (reset to 0 once
    # the plan is stored) finalising. The planning tries are kept here, so the API's
    # `attempts`, the most tries any of its steps needed, never goes back (migration 0007).
    plan_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)

    # Scale-out (docs/architecture.md, "Shards"): the queue its tasks go to (by device), its
    # priority (low | normal | high), and how many of its planned shards are finished.
    queue: Mapped[str] = mapped_column(String(32), default="tightrope.cpu")
    priority: Mapped[str] = mapped_column(String(8), default="normal")
    # Seconds of the model's probe (2 inputs, forward and input gradient) measured by the plan
    # step; each audit's default time limit is derived from it (docs/security.md).
    probe_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    # An endpoint model's audit: the query ledger of its plan step (workers.shared.query_ledger)
    plan_queries: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # ... and how much of its query budget its steps have drawn (workers.execution.query_budget)
    queries_drawn: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    shards_total: Mapped[int] = mapped_column(Integer, default=0)
    shards_done: Mapped[int] = mapped_column(Integer, default=0)

    report_path: Mapped[str | None] = mapped_column(Text, default=None)  # relative to artifact_dir
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AuditShard(Base):
    """One unit of work of an audit (check × subject × slice of images), planned when the audit
    starts and run as its own task by any worker: leased like an audit (owner, expiry,
    heartbeat, attempts), `done` once its result is stored, and never run again after that."""

    __tablename__ = "audit_shards"
    __table_args__ = (
        # The claim query: waiting shards of one queue, in plan order.
        Index("ix_audit_shards_claim", "status", "queue", "audit_id", "position"),
    )
    audit_id: Mapped[str] = mapped_column(
        ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True
    )
    shard_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # queued | running | done | cancelled; rows stored before the plan existed are `done`.
    status: Mapped[str] = mapped_column(String(16), default="queued")
    queue: Mapped[str] = mapped_column(String(32), default="tightrope.cpu")
    position: Mapped[int] = mapped_column(Integer, default=0)  # the plan's order
    check_index: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(64), default="")
    subject: Mapped[str] = mapped_column(String(32), default="model")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)  # who stored it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)  # its latest lease
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class Artifact(Base):
    __tablename__ = "artifacts"
    audit_id: Mapped[str] = mapped_column(
        ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    media_type: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)  # relative to artifact_dir


class WorkerHeartbeat(Base):
    """Written by each live Celery worker; readiness looks here, not at Celery ping."""

    __tablename__ = "worker_heartbeats"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    current_audit_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # Whether the worker can run uploaded code (workers.execution.sandbox_check, migration
    # 0008): "bwrap" (its start-up probe of bubblewrap worked), "off" (TIGHTROPE_SANDBOX=off,
    # unconfined) or "unavailable" (sandbox_problem says why); None: a worker that predates it.
    sandbox: Mapped[str | None] = mapped_column(String(16), default=None)
    sandbox_problem: Mapped[str | None] = mapped_column(Text, default=None)
