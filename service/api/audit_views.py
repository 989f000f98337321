"""The API view of an audit row, and the ETag logic of polling."""

from __future__ import annotations

import hashlib

from schemas.audits import TERMINAL_STATES, AuditLinks, AuditStatus, Progress
from schemas.problem import Problem
from service.db.models import Audit


def to_status(audit: Audit) -> AuditStatus:
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
        error=Problem.model_validate(audit.error) if audit.error else None,
        attempts=audit.attempts,
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


def etag_of(body: bytes) -> str:
    """A strong validator: the body's hash, so any visible change gives a new tag."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def if_none_match_hits(header: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2: weak comparison, a list of tags or `*`."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return etag in tags
