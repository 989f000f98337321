"""The API view of an audit row, and the ETag logic of polling."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from schemas.audits import CheckProgress

# to_status lives outside the HTTP layer: the workers' callbacks send the same view, and the
# audit rules (service.domain.audit_rules) read only its columns for a page of audits.
from service.db.audit_status import STATUS_COLUMNS, to_status
from service.db.tables import Audit, AuditShard

__all__ = [
    "STATUS_COLUMNS",
    "check_progress",
    "etag_of",
    "if_none_match_hits",
    "status_etag",
    "to_status",
]

# STATUS_COLUMNS (service.db.audit_status): the columns `to_status` reads. A poll loads these
# (not the request JSON) and its ETag hashes them, so a 304 is answered without building the body.
# Change STATUS_VIEW_VERSION whenever to_status or AuditStatus renders the same columns
# differently. The per-check progress of a single audit's body is counted from its AuditShard
# rows, not read from these columns: it changes only when a shard finishes, and that bumps
# `shards_done`, so the tag still follows.
STATUS_VIEW_VERSION = "3"


def status_etag(audit: Audit) -> str:
    """A strong validator of the `to_status(audit)` body, from the columns it is built from:
    equal columns render equal bytes, and any column change gives a new tag."""
    values = [getattr(audit, name) for name in STATUS_COLUMNS]
    encoded = json.dumps([STATUS_VIEW_VERSION, *values], sort_keys=True, default=str)
    return '"' + hashlib.sha256(encoded.encode()).hexdigest()[:32] + '"'


def check_progress(session: Session, audit_id: str) -> list[CheckProgress]:
    """Shard progress of each check of one audit: one grouped query over its AuditShard rows
    (the primary key's leading audit_id finds them), in the request's check order."""
    done = func.count(case((AuditShard.status == "done", 1)))
    rows = session.execute(
        select(AuditShard.check_index, AuditShard.kind, func.count(), done)
        .where(AuditShard.audit_id == audit_id)
        .group_by(AuditShard.check_index, AuditShard.kind)
        .order_by(AuditShard.check_index, AuditShard.kind)
    )
    return [
        CheckProgress(
            index=index,
            kind=kind,
            shards_done=finished,
            shards_total=total,
            finished=finished == total,
        )
        for index, kind, total, finished in rows
    ]


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
