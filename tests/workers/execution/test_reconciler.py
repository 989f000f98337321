"""The reconciler on real databases: which rows it re-enqueues, and that it does so once."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from service.db.tables import Audit, Model, utcnow
from service.settings import Settings
from tests.workers.conftest import add_audit, add_model
from workers.execution.reconciler import reconcile_once


def test_expired_leases_and_lost_messages_are_re_enqueued_once(
    settings: Settings, session: Session
) -> None:
    model = add_model(session, settings)
    now = utcnow()
    old = now - timedelta(seconds=settings.requeue_after_seconds + 5)
    lost = add_audit(session, model, enqueued_at=old)
    fresh = add_audit(session, model, enqueued_at=now)
    dead = add_audit(
        session,
        model,
        status="running",
        lease_owner="dead-worker",
        lease_expires_at=now - timedelta(seconds=1),
        attempts=1,
    )
    live = add_audit(
        session,
        model,
        status="running",
        lease_owner="live-worker",
        lease_expires_at=now + timedelta(seconds=30),
        attempts=1,
    )
    sent: list[str] = []
    result = reconcile_once(
        session,
        now,
        settings=settings,
        enqueue_audit=lambda audit_id, *route: sent.append(audit_id),
    )
    assert result.expired_leases == [dead.id]
    assert result.lost_messages == [lost.id]
    assert sorted(sent) == sorted([dead.id, lost.id])
    assert fresh.id not in sent and live.id not in sent

    requeued = session.get(Audit, dead.id, populate_existing=True)
    assert requeued is not None
    assert (requeued.status, requeued.lease_owner, requeued.enqueued_at) == ("queued", None, now)
    assert session.get(Audit, lost.id, populate_existing=True).enqueued_at == now  # type: ignore[union-attr]

    # a second pass at the same moment finds nothing: the timestamps moved
    again: list[str] = []
    reconcile_once(
        session,
        now,
        settings=settings,
        enqueue_audit=lambda audit_id, *route: again.append(audit_id),
    )
    assert again == []


def test_models_stuck_validating_are_re_enqueued(settings: Settings, session: Session) -> None:
    stuck = add_model(session, settings, status="validating")
    recent = add_model(session, settings, status="validating")
    now = utcnow()
    stale = now - timedelta(
        seconds=settings.requeue_after_seconds + settings.admission_time_limit + 1
    )
    session.get(Model, stuck.id).updated_at = stale  # type: ignore[union-attr]
    session.commit()
    sent: list[str] = []
    reconcile_once(session, now, settings=settings, enqueue_admission=sent.append)
    assert sent == [stuck.id]
    assert recent.id not in sent


def test_a_broker_outage_does_not_stop_the_pass(settings: Settings, session: Session) -> None:
    model = add_model(session, settings)
    now = utcnow()
    old = now - timedelta(seconds=settings.requeue_after_seconds + 5)
    first, second = (
        add_audit(session, model, enqueued_at=old),
        add_audit(session, model, enqueued_at=old),
    )
    tried: list[str] = []

    def broken(audit_id: str, *route: object) -> None:
        tried.append(audit_id)
        raise ConnectionError("redis is down")

    result = reconcile_once(session, now, settings=settings, enqueue_audit=broken)
    assert sorted(tried) == sorted([first.id, second.id]) == sorted(result.lost_messages)
