"""Leases on audit rows: the database decides which task owns an audit.

Every function is one atomic conditional UPDATE and commits it, so two workers that receive
the same message (a duplicate delivery, a re-enqueue by the reconciler) cannot both run it:
the UPDATE of the second finds a live lease and changes nothing.
"""

from __future__ import annotations

import enum
import os
import socket
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, and_, case, or_, update
from sqlalchemy.orm import Session

from schemas import problem as problems
from service.db.models import Audit

LEASABLE_STATES = ("queued", "running")


class LeaseOutcome(enum.Enum):
    ACQUIRED = "acquired"
    BUSY = "busy"  # a live lease elsewhere, a finished audit, or no such audit: do nothing
    GAVE_UP = "gave_up"  # the attempt cap was reached: the audit is now failed


def new_owner() -> str:
    """A name unique to one attempt by one process (host, pid, random part)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def gave_up_problem(attempts: int) -> dict[str, Any]:
    return problems.ATTEMPTS_EXHAUSTED.document(
        f"gave up after {attempts} attempts: each one ended without a result "
        "(the worker or the runner was killed)"
    )


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return result.rowcount


def _lease_free(now: datetime) -> Any:
    return or_(Audit.lease_owner.is_(None), Audit.lease_expires_at < now)


def acquire_lease(
    session: Session,
    audit_id: str,
    owner: str,
    *,
    now: datetime,
    lease_seconds: float,
    max_attempts: int,
) -> LeaseOutcome:
    """Take the audit for `owner` (attempts + 1, status running) if its lease is free."""
    expires = now + timedelta(seconds=lease_seconds)
    taken = session.execute(
        update(Audit)
        .where(
            Audit.id == audit_id,
            Audit.status.in_(LEASABLE_STATES),
            _lease_free(now),
            Audit.attempts < max_attempts,
        )
        .values(
            lease_owner=owner,
            lease_expires_at=expires,
            heartbeat_at=now,
            attempts=Audit.attempts + 1,
            status="running",
        )
        .execution_options(synchronize_session=False)
    )
    if _rowcount(taken) == 1:
        # started_at is set once, by the first attempt; later attempts keep it.
        session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.started_at.is_(None))
            .values(started_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return LeaseOutcome.ACQUIRED

    attempts = session.scalar(
        update(Audit)
        .where(
            Audit.id == audit_id,
            Audit.status.in_(LEASABLE_STATES),
            _lease_free(now),
            Audit.attempts >= max_attempts,
        )
        .values(
            status="failed",
            error=gave_up_problem(max_attempts),
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(Audit.attempts)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return LeaseOutcome.BUSY if attempts is None else LeaseOutcome.GAVE_UP


def renew_lease(
    session: Session, audit_id: str, owner: str, *, now: datetime, lease_seconds: float
) -> bool:
    """Extend the lease; False when `owner` no longer holds it (it must stop at once)."""
    renewed = session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.lease_owner == owner, Audit.status == "running")
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(renewed) == 1


def update_owned(session: Session, audit_id: str, owner: str, **values: Any) -> bool:
    """Write columns of an audit, and commit, only while `owner` holds its lease."""
    changed = session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.lease_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    # Whatever else the caller staged in this transaction (artifact rows) stands or falls with
    # the lease: a task that lost its audit writes nothing.
    if _rowcount(changed) == 1:
        session.commit()
        return True
    session.rollback()
    return False


def monotone_progress(
    fraction: Any, *, check: str | None = None, message: str | None = None
) -> dict[str, Any]:
    """The UPDATE values that store an audit's progress without ever lowering it: a fraction
    below the stored one changes nothing (nor the check and message that came with it), so a
    step that starts counting again (the finalising runner begins at 0.0) or a late write of
    an older count never makes progress go backwards. `fraction` may be a SQL expression."""
    lower = Audit.progress_fraction > fraction
    values: dict[str, Any] = {
        "progress_fraction": case((lower, Audit.progress_fraction), else_=fraction)
    }
    if check is not None:
        values["progress_check"] = case((lower, Audit.progress_check), else_=check)
    if message is not None:
        values["progress_message"] = case((lower, Audit.progress_message), else_=message)
    return values


def release_lease(session: Session, audit_id: str, owner: str, **values: Any) -> bool:
    """Give the lease up, writing `values` (the final status...) in the same UPDATE."""
    return update_owned(session, audit_id, owner, lease_owner=None, lease_expires_at=None, **values)


def expired_lease_condition(now: datetime) -> Any:
    return and_(Audit.status == "running", Audit.lease_expires_at < now)
