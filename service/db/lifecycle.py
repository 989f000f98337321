"""The lifecycle of audits and their shards: every write of an audit's or a shard's status, and
of the lease and progress columns that go with it, for the gateway and the workers alike
(docs/architecture.md, "The lifecycle of an audit"). tests/test_layers.py checks that no
`update(Audit)`, `update(AuditShard)`, new row with a status, or `.status =` is written
anywhere else.

Leases decide which task owns an audit or a shard. Every lease function is one atomic
conditional UPDATE and commits it, so two workers that receive the same message (a duplicate
delivery, a re-enqueue by the reconciler) cannot both run it: the UPDATE of the second finds a
live lease and changes nothing; a worker that lost its lease writes nothing.

States (schemas.audits): an audit is `queued` (submitted, or given back to be retried),
`running` (a task holds its lease, or its shards run), then `succeeded`, `failed` or
`cancelled`. A shard is `queued`, `running` (a worker holds its lease), then `done` or
`cancelled`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, and_, case, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas import problem as problems
from schemas.audits import TERMINAL_STATES
from schemas.runner import PlannedShard
from service.db.tables import Audit, AuditShard, utcnow

LEASABLE_STATES = ("queued", "running")
BATCH = 500  # rows the reconciler claims per condition and pass


class LeaseOutcome(enum.Enum):
    ACQUIRED = "acquired"
    BUSY = "busy"  # a live lease elsewhere, a finished audit, or no such audit: do nothing
    GAVE_UP = "gave_up"  # the attempt cap was reached: the audit is now failed


def gave_up_problem(attempts: int) -> dict[str, Any]:
    return problems.ATTEMPTS_EXHAUSTED.document(
        f"gave up after {attempts} attempts: each one ended without a result "
        "(the worker or the runner was killed)"
    )


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return result.rowcount


# --- A new audit (the gateway's submission) ---------------------------------------------------


def new_audit(**values: Any) -> Audit:
    """The row of a submitted audit: `queued`, to be added and committed by the caller."""
    return Audit(status="queued", **values)


# --- Audit leases (the planning and the finalising task) --------------------------------------


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


def _commit_if_one_row(session: Session, result: Any) -> bool:
    """Commit when the conditional UPDATE matched its one row (the owner still holds the
    lease), else roll back everything staged with it."""
    if _rowcount(result) == 1:
        session.commit()
        return True
    session.rollback()
    return False


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
    return _commit_if_one_row(session, changed)


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


def hold_for_fair_share(session: Session, audit_id: str, now: datetime) -> None:
    """A queued audit waits for its tenant's share: marked as freshly sent (committed), so the
    reconciler does not send it again at once."""
    session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.status == "queued")
        .values(enqueued_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def record_probe_seconds(session: Session, audit_id: str, seconds: float) -> None:
    """Keep the probe time the plan step measured (not committed: the plan's release does)."""
    session.execute(
        update(Audit)
        .where(Audit.id == audit_id)
        .values(probe_seconds=seconds)
        .execution_options(synchronize_session=False)
    )


def draw_queries(session: Session, audit_id: str, inputs: int, budget: int) -> bool:
    """Draw `inputs` from an endpoint audit's query budget, unless that would exceed `budget`:
    one atomic conditional update (the audit's steps draw at once on several workers)."""
    changed = session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.queries_drawn + inputs <= budget)
        .values(queries_drawn=Audit.queries_drawn + inputs)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return changed.rowcount == 1  # type: ignore[attr-defined]


def give_back_queries(session: Session, audit_id: str, inputs: int) -> None:
    """What a step drew from the query budget and did not send."""
    session.execute(
        update(Audit)
        .where(Audit.id == audit_id)
        .values(queries_drawn=Audit.queries_drawn - inputs)
        .execution_options(synchronize_session=False)
    )
    session.commit()


# --- Shards: the plan, the results the planning or finalising task stores ----------------------


def stage_planned_shards(
    session: Session,
    audit_id: str,
    shards: Sequence[PlannedShard],
    queue: str,
    now: datetime,
) -> int:
    """Stage the planned shards as rows, keeping any stored before (their place in the plan is
    rewritten, their status kept); not committed: they stand or fall with the release of the
    planning task's lease. Returns how many wait to run (not `done`)."""
    known = {
        shard_id: status
        for shard_id, status in session.execute(
            select(AuditShard.shard_id, AuditShard.status).where(AuditShard.audit_id == audit_id)
        )
    }
    waiting = 0
    for position, shard in enumerate(shards):
        values = {
            "queue": queue,
            "position": position,
            "check_index": shard.check_index,
            "kind": shard.kind[:64],
            "subject": shard.subject[:32],
        }
        if shard.shard_id in known:
            session.execute(
                update(AuditShard)
                .where(
                    AuditShard.audit_id == audit_id,
                    AuditShard.shard_id == shard.shard_id,
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            waiting += known[shard.shard_id] != "done"
            continue
        session.add(
            AuditShard(
                audit_id=audit_id,
                shard_id=shard.shard_id,
                status="queued",
                enqueued_at=now,
                **values,
            )
        )
        waiting += 1
    return waiting


def store_shard_result(
    session: Session, audit_id: str, shard_id: str, result: dict[str, Any]
) -> None:
    """A shard result the audit's own task reported: stored `done` once (committed); a shard
    stored before, or meanwhile by a concurrent attempt (the same result), is kept."""
    exists_ = session.get(AuditShard, (audit_id, shard_id))
    if exists_ is not None and exists_.status == "done":
        return
    if exists_ is not None:
        exists_.status, exists_.result, exists_.finished_at = "done", result, utcnow()
    else:
        session.add(
            AuditShard(
                audit_id=audit_id,
                shard_id=shard_id,
                status="done",
                result=result,
                finished_at=utcnow(),
            )
        )
    try:
        session.commit()
    except IntegrityError:  # stored meanwhile by a concurrent attempt: same result
        session.rollback()


# --- Shard leases (the workers running shards) -------------------------------------------------


def take_shard(
    session: Session,
    audit_id: str,
    shard_id: str,
    owner: str,
    *,
    now: datetime,
    lease_seconds: float,
) -> bool:
    """Lease the waiting shard for `owner` (attempts + 1, status running), committed; False
    when another worker took it first."""
    taken = session.execute(
        update(AuditShard)
        .where(
            AuditShard.audit_id == audit_id,
            AuditShard.shard_id == shard_id,
            AuditShard.status == "queued",
        )
        .values(
            status="running",
            started_at=now,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            attempts=AuditShard.attempts + 1,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(taken) == 1


def _owned(audit_id: str, shard_id: str, owner: str) -> Any:
    return and_(
        AuditShard.audit_id == audit_id,
        AuditShard.shard_id == shard_id,
        AuditShard.lease_owner == owner,
        AuditShard.status == "running",
    )


def renew_shard(
    session: Session, audit_id: str, shard_id: str, owner: str, *, now: datetime, seconds: float
) -> bool:
    """Extend the lease; False when `owner` no longer holds it (it must stop at once)."""
    renewed = session.execute(
        update(AuditShard)
        .where(_owned(audit_id, shard_id, owner))
        .values(lease_expires_at=now + timedelta(seconds=seconds), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(renewed) == 1


def release_shard(
    session: Session, audit_id: str, shard_id: str, owner: str, **values: Any
) -> bool:
    """End `owner`'s lease, writing `values` (done + result, queued again, cancelled)."""
    changed = session.execute(
        update(AuditShard)
        .where(_owned(audit_id, shard_id, owner))
        .values(lease_owner=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return _commit_if_one_row(session, changed)


def count_progress(session: Session, audit_id: str, now: datetime) -> tuple[int, int]:
    """Store the audit's finished-shard count and progress; returns (done, total)."""
    done_count = (
        select(func.count())
        .select_from(AuditShard)
        .where(AuditShard.audit_id == audit_id, AuditShard.status == "done")
        .scalar_subquery()
    )
    # One statement computes and stores the count: the last of two workers finishing at
    # once sees both shards, whichever order their transactions commit in.
    session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.status == "running")
        .values(
            shards_done=done_count,
            **monotone_progress(
                func.coalesce(done_count * 1.0 / func.nullif(Audit.shards_total, 0), 0.0)
            ),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    row = session.execute(
        select(Audit.shards_done, Audit.shards_total).where(Audit.id == audit_id)
    ).one_or_none()
    return (int(row[0]), int(row[1])) if row is not None else (0, 0)


def expired_shard_condition(now: datetime) -> Any:
    return and_(AuditShard.status == "running", AuditShard.lease_expires_at < now)


def stale_shard_condition(cutoff: datetime) -> Any:
    """Shards waiting since before `cutoff` (their token may be lost) of live audits."""
    return and_(
        AuditShard.status == "queued",
        or_(AuditShard.enqueued_at < cutoff, AuditShard.enqueued_at.is_(None)),
    )


# --- Ending an audit: its waiting shards, the cancel, the end of the shard phase ---------------


def cancel_waiting_shards(
    session: Session, audit_id: str, now: datetime | None = None, *, commit: bool = True
) -> None:
    """A finished audit's waiting shards will never run: their tokens then find nothing. A
    cancelled shard has a finish time."""
    session.execute(
        update(AuditShard)
        .where(AuditShard.audit_id == audit_id, AuditShard.status == "queued")
        .values(status="cancelled", finished_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    if commit:
        session.commit()


def end_shard_phase(
    session: Session,
    audit_id: str,
    *,
    status: str,
    now: datetime,
    error: dict[str, Any] | None = None,
    unless_a_shard_runs: bool = False,
) -> bool:
    """End an audit in its shard phase (no task holds its lease): failed by a shard, or
    cancelled; its waiting shards are cancelled. Conditional, so the first ending wins; with
    `unless_a_shard_runs` (the gateway's cancel) only a planned audit with no shard running
    ends: a running shard's worker ends it otherwise. Not committed: the caller commits."""
    conditions = [
        Audit.id == audit_id,
        Audit.status.in_(LEASABLE_STATES),
        Audit.lease_owner.is_(None),
    ]
    if unless_a_shard_runs:
        running_shard = exists().where(
            AuditShard.audit_id == audit_id, AuditShard.status == "running"
        )
        conditions += [Audit.shards_total > 0, ~running_shard]
    ended = session.execute(
        update(Audit)
        .where(*conditions)
        .values(status=status, error=error, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(ended) != 1:
        return False
    cancel_waiting_shards(session, audit_id, now, commit=False)
    return True


def cancel(session: Session, audit_id: str, now: datetime) -> bool:
    """The gateway's cancel of an unfinished audit, not committed (the caller commits): a
    queued audit ends at once; a running one is asked to stop (`cancel_requested`), its waiting
    shards are cancelled, and it ends here when it is in its shard phase with no shard running.
    Returns whether it ended here (then no worker will touch it again)."""
    # Conditional updates: a worker may take the audit between our read and our write.
    cancelled_queued = session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
    )
    if _rowcount(cancelled_queued) == 1:
        return True
    requested = session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.status.not_in(TERMINAL_STATES))
        .values(cancel_requested=True, updated_at=now)
    )
    if _rowcount(requested) != 1:
        return False
    # Running: no worker may claim its waiting shards any more; the workers running one stop
    # it themselves (they see cancel_requested), and finished ones stay done.
    cancel_waiting_shards(session, audit_id, now, commit=False)
    return end_shard_phase(session, audit_id, status="cancelled", now=now, unless_a_shard_runs=True)


# --- The reconciler's claims: each row moved by an UPDATE that re-checks its condition --------


def claim_audits(session: Session, condition: Any, values: dict[str, object]) -> list[str]:
    """Ids matching `condition`, each moved by an UPDATE that re-checks it (first one wins)."""
    claimed: list[str] = []
    for audit_id in session.scalars(select(Audit.id).where(condition).limit(BATCH)).all():
        result = session.execute(
            update(Audit)
            .where(Audit.id == audit_id, condition)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if _rowcount(result) == 1:
            claimed.append(audit_id)
    return claimed


def stale_queued_condition(cutoff: datetime) -> Any:
    return and_(
        Audit.status == "queued",
        Audit.lease_owner.is_(None),
        or_(
            Audit.enqueued_at < cutoff,
            and_(Audit.enqueued_at.is_(None), Audit.created_at < cutoff),
        ),
    )


def unfinalised_condition(cutoff: datetime) -> Any:
    """Planned audits nobody holds, quiet since `cutoff`, with no shard waiting or running."""
    unfinished = exists().where(
        AuditShard.audit_id == Audit.id, AuditShard.status.in_(("queued", "running"))
    )
    return and_(
        Audit.status == "running",
        Audit.lease_owner.is_(None),
        Audit.shards_total > 0,
        Audit.updated_at < cutoff,
        ~unfinished,
    )


def requeue_expired_audits(session: Session, now: datetime) -> list[str]:
    """A dead worker's audits go back to `queued` (their lease expired)."""
    return claim_audits(
        session,
        expired_lease_condition(now),
        {"status": "queued", "lease_owner": None, "lease_expires_at": None, "enqueued_at": now},
    )


def resend_stale_queued(session: Session, cutoff: datetime, now: datetime) -> list[str]:
    """Audits queued since before `cutoff` (their message may be lost), marked as sent now."""
    return claim_audits(session, stale_queued_condition(cutoff), {"enqueued_at": now})


def resend_unfinalised(session: Session, cutoff: datetime, now: datetime) -> list[str]:
    """Planned audits whose finalising message was lost, marked as touched now."""
    return claim_audits(session, unfinalised_condition(cutoff), {"updated_at": now})


def claim_shard_row(
    session: Session, audit_id: str, shard_id: str, condition: Any, values: dict[str, object]
) -> bool:
    """Move one shard matching `condition` (committed); False when it no longer matches."""
    moved = session.execute(
        update(AuditShard)
        .where(AuditShard.audit_id == audit_id, AuditShard.shard_id == shard_id, condition)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(moved) == 1


def requeue_expired_shard(session: Session, audit_id: str, shard_id: str, now: datetime) -> bool:
    """A dead worker's shard goes back to `queued` (its lease expired)."""
    back = {"status": "queued", "lease_owner": None, "lease_expires_at": None}
    return claim_shard_row(
        session, audit_id, shard_id, expired_shard_condition(now), {**back, "enqueued_at": now}
    )


def resend_stale_shard(
    session: Session, audit_id: str, shard_id: str, cutoff: datetime, now: datetime
) -> bool:
    """A shard waiting since before `cutoff`, marked as sent now."""
    return claim_shard_row(
        session, audit_id, shard_id, stale_shard_condition(cutoff), {"enqueued_at": now}
    )
