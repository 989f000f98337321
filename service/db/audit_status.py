"""The API view of an audit row (`AuditStatus`): polled by clients, and POSTed to an audit's
callback_url when it finishes. Outside service/api/ so the workers may use it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas.audits import (
    TERMINAL_STATES,
    AuditLinks,
    AuditStatus,
    CheckProgress,
    Progress,
    ShardProgress,
)
from schemas.problem import Problem, read_stored
from service.db.tables import Audit

# The columns `to_status` reads: a poll or a page of audits loads only these (not the request
# JSON), and a poll's ETag hashes them (service/api/audit_views.py, STATUS_VIEW_VERSION).
STATUS_COLUMNS = (
    "id",
    "model_id",
    "status",
    "progress_fraction",
    "progress_check",
    "progress_message",
    "verdict",
    "error",
    "attempts",
    "plan_attempts",
    "cancel_requested",
    "priority",
    "shards_total",
    "shards_done",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
)


def to_status(audit: Audit, checks: Sequence[CheckProgress] | None = None) -> AuditStatus:
    """The view of `audit`; `checks` (per-check shard progress, counted from its AuditShard
    rows by the caller) only where one audit is read: lists and callbacks leave it out."""
    base = f"/v1/audits/{audit.id}"
    terminal = audit.status in TERMINAL_STATES
    return AuditStatus(
        id=audit.id,
        model_id=audit.model_id,
        status=audit.status,
        progress=Progress(
            fraction=min(max(audit.progress_fraction, 0.0), 1.0),
            current_check=audit.progress_check,
            message=audit.progress_message,
        ),
        verdict=audit.verdict,
        error=_problem(audit.error, base),
        # The most tries any step needed: `attempts` restarts at 0 for the finalising step.
        attempts=max(audit.attempts or 0, audit.plan_attempts or 0),
        cancel_requested=bool(audit.cancel_requested),
        priority=audit.priority or "normal",
        shards=ShardProgress(done=audit.shards_done or 0, total=audit.shards_total or 0),
        checks=list(checks) if checks is not None else None,
        created_at=audit.created_at,
        started_at=audit.started_at,
        finished_at=audit.finished_at,
        updated_at=audit.updated_at,
        links=AuditLinks(
            self=base,
            report=f"{base}/report" if audit.status == "succeeded" else None,
            cancel=None if terminal else f"{base}/cancel",
        ),
    )


def _problem(error: dict[str, Any] | None, instance: str) -> Problem | None:
    """The stored problem of a failed audit, read as the table of problem types defines it
    today (schemas.problem.read_stored: an older `internal` reads as `internal-error`); its
    `instance` is the audit itself (RFC 9457: the occurrence), as the gateway's own problems
    name the request path."""
    if not error:
        return None
    problem = read_stored(error)
    return problem if problem.instance else problem.model_copy(update={"instance": instance})
