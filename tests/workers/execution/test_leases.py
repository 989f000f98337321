"""Leases on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.lifecycle import (
    LeaseOutcome,
    acquire_lease,
    cancel,
    end_shard_phase,
    release_lease,
    renew_lease,
)
from service.db.tables import Audit, AuditShard, utcnow
from service.settings import Settings
from tests.workers.conftest import add_audit, add_model


def _acquire(session: Session, audit_id: str, owner: str, now=None, max_attempts: int = 3):  # type: ignore[no-untyped-def]
    return acquire_lease(
        session, audit_id, owner, now=now or utcnow(), lease_seconds=30, max_attempts=max_attempts
    )


def test_two_concurrent_acquirers_exactly_one_wins(
    settings: Settings, sessions: sessionmaker[Session], session: Session
) -> None:
    audit = add_audit(session, add_model(session, settings))
    barrier = threading.Barrier(4)
    outcomes: list[LeaseOutcome] = []

    def contend(owner: str) -> None:
        with sessions() as own_session:
            barrier.wait()
            outcomes.append(_acquire(own_session, audit.id, owner))

    threads = [threading.Thread(target=contend, args=(f"owner-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(o.value for o in outcomes) == ["acquired", "busy", "busy", "busy"]
    row = session.get(Audit, audit.id, populate_existing=True)
    assert row is not None and row.status == "running" and row.attempts == 1
    assert row.started_at is not None and row.lease_owner is not None


def test_a_live_lease_refuses_a_duplicate_delivery_and_an_expired_one_is_taken_over(
    settings: Settings, session: Session
) -> None:
    audit = add_audit(session, add_model(session, settings))
    now = utcnow()
    assert _acquire(session, audit.id, "first", now) is LeaseOutcome.ACQUIRED
    assert _acquire(session, audit.id, "second", now + timedelta(seconds=10)) is LeaseOutcome.BUSY
    later = now + timedelta(seconds=31)
    assert _acquire(session, audit.id, "second", later) is LeaseOutcome.ACQUIRED
    row = session.get(Audit, audit.id, populate_existing=True)
    assert row is not None
    assert (row.lease_owner, row.attempts, row.started_at) == ("second", 2, now)
    # the first owner lost it: it can neither renew nor write its result
    assert not renew_lease(session, audit.id, "first", now=later, lease_seconds=30)
    assert not release_lease(session, audit.id, "first", status="succeeded")
    assert renew_lease(session, audit.id, "second", now=later, lease_seconds=30)
    assert release_lease(session, audit.id, "second", status="succeeded")
    assert session.get(Audit, audit.id, populate_existing=True).status == "succeeded"  # type: ignore[union-attr]
    # a finished audit is never leased again
    assert _acquire(session, audit.id, "third", later) is LeaseOutcome.BUSY


def test_attempts_are_capped(settings: Settings, session: Session) -> None:
    audit = add_audit(session, add_model(session, settings))
    now = utcnow()
    for attempt in range(3):
        moment = now + timedelta(seconds=60 * attempt)
        assert _acquire(session, audit.id, f"o{attempt}", moment) is LeaseOutcome.ACQUIRED
    outcome = _acquire(session, audit.id, "o3", now + timedelta(seconds=180))
    assert outcome is LeaseOutcome.GAVE_UP
    row = session.get(Audit, audit.id, populate_existing=True)
    assert row is not None and row.status == "failed" and row.attempts == 3
    assert row.error is not None and "gave up after 3 attempts" in row.error["detail"]
    assert row.lease_owner is None


def _shard_phase(session: Session, settings: Settings, shards: dict[str, str]) -> str:
    """An audit in its shard phase (running, no lease holder) with shards in these states."""
    audit = add_audit(
        session, add_model(session, settings), status="running", shards_total=len(shards)
    )
    for position, (shard_id, status) in enumerate(shards.items()):
        session.add(
            AuditShard(
                audit_id=audit.id, shard_id=shard_id, status=status, queue="q", position=position
            )
        )
    session.commit()
    return audit.id


def _shards(session: Session, audit_id: str) -> dict[str, tuple[str, bool]]:
    rows = session.scalars(select(AuditShard).where(AuditShard.audit_id == audit_id))
    return {r.shard_id: (r.status, r.finished_at is not None) for r in rows}


def test_ending_a_shard_phase_is_one_function_and_a_cancelled_shard_has_a_finish_time(
    settings: Settings, session: Session
) -> None:
    """Issue 22: the gateway's and the workers' endings of a shard-phase audit are one
    (end_shard_phase); the gateway's version won where they differed: a shard cancelled
    because its audit ended has a finish time, whoever ended it."""
    audit_id = _shard_phase(session, settings, {"a": "done", "b": "running", "c": "queued"})
    now = utcnow()
    # the gateway's cancel leaves an audit with a running shard to that shard's worker
    assert not end_shard_phase(
        session, audit_id, status="cancelled", now=now, unless_a_shard_runs=True
    )
    session.commit()
    # a worker's ending (a shard's error) ends it whatever runs elsewhere; the first one wins
    assert end_shard_phase(session, audit_id, status="failed", now=now, error={"detail": "x"})
    session.commit()
    assert not end_shard_phase(session, audit_id, status="cancelled", now=now)
    session.commit()
    audit = session.get(Audit, audit_id, populate_existing=True)
    assert audit is not None
    assert (audit.status, audit.error, audit.finished_at is not None) == (
        "failed",
        {"detail": "x"},
        True,
    )
    assert _shards(session, audit_id) == {
        "a": ("done", False),
        "b": ("running", False),
        "c": ("cancelled", True),
    }


def test_the_gateways_cancel_ends_a_shard_phase_with_no_shard_running(
    settings: Settings, session: Session
) -> None:
    audit_id = _shard_phase(session, settings, {"a": "done", "b": "queued"})
    assert cancel(session, audit_id, utcnow())
    session.commit()
    audit = session.get(Audit, audit_id, populate_existing=True)
    assert audit is not None
    assert (audit.status, audit.cancel_requested, audit.finished_at is not None) == (
        "cancelled",
        True,
        True,
    )
    assert _shards(session, audit_id) == {"a": ("done", False), "b": ("cancelled", True)}
    assert not cancel(session, audit_id, utcnow())  # finished: nothing changes
