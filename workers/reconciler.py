"""Re-enqueue the work whose message was lost: the database is the source of truth.

Three cases: an audit whose worker died (its lease expired), an audit still `queued` long after
it was enqueued (Redis restarted without persistence, or was flushed), and a model stuck in
`validating`. Each row is claimed by a conditional UPDATE that also moves its timestamp, so two
reconcilers running at once re-enqueue it once; a duplicate message would be harmless anyway,
since the task's lease refuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service import queue
from service.db.models import Audit, Model
from service.settings import Settings, get_settings
from workers.leases import expired_lease_condition

log = logging.getLogger(__name__)

BATCH = 500


@dataclass
class ReconcileResult:
    expired_leases: list[str] = field(default_factory=list)
    lost_messages: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)


def _stale_queued_condition(cutoff: datetime):
    return and_(
        Audit.status == "queued",
        Audit.lease_owner.is_(None),
        or_(
            Audit.enqueued_at < cutoff,
            and_(Audit.enqueued_at.is_(None), Audit.created_at < cutoff),
        ),
    )


def _claim_audits(session: Session, condition, values: dict[str, object]) -> list[str]:
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
        if result.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(audit_id)
    return claimed


def stalled_admission_seconds(settings: Settings) -> float:
    # A model legitimately stays `validating` while its admission runs.
    return settings.requeue_after_seconds + settings.admission_time_limit


def reconcile_once(
    session: Session,
    now: datetime,
    *,
    settings: Settings | None = None,
    enqueue_audit: Callable[[str], None] = queue.enqueue_audit,
    enqueue_admission: Callable[[str], None] = queue.enqueue_admission,
) -> ReconcileResult:
    """One pass; the rows are committed before their messages are sent."""
    settings = settings or get_settings()
    result = ReconcileResult()

    # A dead worker's audit goes back to `queued`: if this message is lost too, the
    # stale-queued rule below picks it up again after requeue_after_seconds.
    result.expired_leases = _claim_audits(
        session,
        expired_lease_condition(now),
        {"status": "queued", "lease_owner": None, "lease_expires_at": None, "enqueued_at": now},
    )
    cutoff = now - timedelta(seconds=settings.requeue_after_seconds)
    result.lost_messages = _claim_audits(
        session, _stale_queued_condition(cutoff), {"enqueued_at": now}
    )

    model_cutoff = now - timedelta(seconds=stalled_admission_seconds(settings))
    stalled = and_(
        Model.status == "validating", Model.deleted_at.is_(None), Model.updated_at < model_cutoff
    )
    for model_id in session.scalars(select(Model.id).where(stalled).limit(BATCH)).all():
        touched = session.execute(
            update(Model)
            .where(Model.id == model_id, stalled)
            .values(updated_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if touched.rowcount == 1:  # type: ignore[attr-defined]
            result.models.append(model_id)

    for audit_id in result.expired_leases + result.lost_messages:
        _send(enqueue_audit, audit_id)
    for model_id in result.models:
        _send(enqueue_admission, model_id)
    if result.expired_leases or result.lost_messages or result.models:
        log.info("reconciler re-enqueued %s", result)
    return result


def _send(enqueue: Callable[[str], None], item_id: str) -> None:
    # A broker outage must not stop the pass: the row's new timestamp brings it back later.
    try:
        enqueue(item_id)
    except Exception:
        log.exception("could not re-enqueue %s", item_id)
