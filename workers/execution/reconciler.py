"""Re-enqueue the work whose message was lost: the database is the source of truth.

The cases: an audit whose worker died (its lease expired), an audit still `queued` long after
it was enqueued (Redis restarted without persistence, or was flushed), a model stuck in
`validating`; and for audits in their shard phase: a shard whose worker died, a shard whose
token was lost, and an audit whose shards are all stored but whose finalising message was lost
(or never sent: the worker died between storing the last shard and sending it).

Each row is claimed by a conditional UPDATE that also moves its timestamp (written by
service.db.lifecycle, as every status), so two reconcilers running at once re-enqueue it once;
a duplicate message would be harmless anyway, since the task's lease refuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from service.db.lifecycle import (
    BATCH,
    expired_shard_condition,
    requeue_expired_audits,
    requeue_expired_shard,
    resend_stale_queued,
    resend_stale_shard,
    resend_unfinalised,
    stale_shard_condition,
)
from service.db.tables import Audit, AuditShard, Model
from service.queue import broker as queue
from service.queue.dispatch import get_dispatcher
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)


@dataclass
class ReconcileResult:
    expired_leases: list[str] = field(default_factory=list)
    lost_messages: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)  # "<audit>/<shard>" given a new token
    finalising: list[str] = field(default_factory=list)  # audits sent to be finalised


def stalled_admission_seconds(settings: Settings) -> float:
    # A model legitimately stays `validating` while its admission runs.
    return settings.requeue_after_seconds + settings.admission_time_limit


def reconcile_once(
    session: Session,
    now: datetime,
    *,
    settings: Settings | None = None,
    enqueue_audit: Callable[..., object] | None = None,
    enqueue_admission: Callable[[str], object] | None = None,
    enqueue_shards: Callable[..., object] | None = None,
    count_tokens: Callable[[str], int | None] | None = None,
) -> ReconcileResult:
    """One pass; the rows are committed before their messages are sent (by the dispatcher,
    unless the caller passes its own senders)."""
    settings = settings or get_settings()
    enqueue_audit = enqueue_audit or get_dispatcher().audit
    enqueue_admission = enqueue_admission or get_dispatcher().admission
    enqueue_shards = enqueue_shards or get_dispatcher().shards
    result = ReconcileResult()

    # A dead worker's audit goes back to `queued`: if this message is lost too, the
    # stale-queued rule below picks it up again after requeue_after_seconds.
    result.expired_leases = requeue_expired_audits(session, now)
    cutoff = now - timedelta(seconds=settings.requeue_after_seconds)
    result.lost_messages = resend_stale_queued(session, cutoff, now)

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

    tokens_in = count_tokens or (lambda name: queue.tokens_waiting(settings, name))
    shard_tokens = _reclaim_shards(session, now, cutoff, result, tokens_in)
    result.finalising = resend_unfinalised(session, cutoff, now)

    audits = result.expired_leases + result.lost_messages + result.finalising
    routes = _routes(session, [*audits, *shard_tokens])
    for audit_id in audits:
        _send(enqueue_audit, audit_id, *routes.get(audit_id, _DEFAULT_ROUTE))
    for audit_id, count in shard_tokens.items():
        _send(enqueue_shards, audit_id, *routes.get(audit_id, _DEFAULT_ROUTE), count)
    for model_id in result.models:
        _send(enqueue_admission, model_id)
    if any(
        (
            result.expired_leases,
            result.lost_messages,
            result.models,
            result.shards,
            result.finalising,
        )
    ):
        log.info("reconciler re-enqueued %s", result)
    return result


_DEFAULT_ROUTE = (queue.QUEUE_CPU, queue.DEFAULT_PRIORITY)


def _routes(session: Session, audit_ids: list[str]) -> dict[str, tuple[str, str]]:
    if not audit_ids:
        return {}
    rows = session.execute(
        select(Audit.id, Audit.queue, Audit.priority).where(Audit.id.in_(audit_ids))
    )
    return {audit_id: (queue_name, priority) for audit_id, queue_name, priority in rows}


def _reclaim_shards(
    session: Session,
    now: datetime,
    cutoff: datetime,
    result: ReconcileResult,
    tokens_in: Callable[[str], int | None],
) -> dict[str, int]:
    """Shards of a dead worker go back to `queued` with a new token. Shards waiting since
    before `cutoff` get a new token only for the shortfall of their queue (waiting shards
    minus the messages still in it), so a queue that is merely slow is not flooded. Returns
    how many tokens each audit needs."""
    live_audit = select(Audit.id).where(
        Audit.status == "running", Audit.cancel_requested.is_(False)
    )
    tokens: dict[str, int] = {}

    def claimed(moved: bool, audit_id: str, shard_id: str) -> bool:
        if not moved:
            return False
        result.shards.append(f"{audit_id}/{shard_id}")
        tokens[audit_id] = tokens.get(audit_id, 0) + 1
        return True

    expired = expired_shard_condition(now)
    for audit_id, shard_id in session.execute(
        select(AuditShard.audit_id, AuditShard.shard_id)
        .where(expired, AuditShard.audit_id.in_(live_audit))
        .limit(BATCH)
    ).all():
        claimed(requeue_expired_shard(session, audit_id, shard_id, now), audit_id, shard_id)

    stale = stale_shard_condition(cutoff)
    found = session.execute(
        select(AuditShard.queue, AuditShard.audit_id, AuditShard.shard_id)
        .where(stale, AuditShard.audit_id.in_(live_audit))
        .order_by(AuditShard.queue, AuditShard.enqueued_at)
        .limit(BATCH)
    ).all()
    allowance: dict[str, int | None] = {}
    for queue_name, audit_id, shard_id in found:
        if queue_name not in allowance:
            allowance[queue_name] = _shortfall(session, queue_name, tokens_in(queue_name))
        left = allowance[queue_name]
        if left is not None and left <= 0:
            continue
        moved = resend_stale_shard(session, audit_id, shard_id, cutoff, now)
        if claimed(moved, audit_id, shard_id) and left is not None:
            allowance[queue_name] = left - 1
    return tokens


def _shortfall(session: Session, queue_name: str, in_broker: int | None) -> int | None:
    """Waiting shards of live audits in `queue_name` that no message in the broker covers."""
    if in_broker is None:
        return None  # cannot tell: every stale shard gets a token (duplicates are harmless)
    waiting = session.scalar(
        select(func.count())
        .select_from(AuditShard)
        .join(Audit, Audit.id == AuditShard.audit_id)
        .where(
            AuditShard.queue == queue_name,
            AuditShard.status == "queued",
            Audit.status == "running",
            Audit.cancel_requested.is_(False),
        )
    )
    return int(waiting or 0) - in_broker


def _send(enqueue: Callable[..., object], *args: object) -> None:
    # A broker outage must not stop the pass: the row's new timestamp brings it back later.
    try:
        enqueue(*args)
    except Exception:
        log.exception("could not re-enqueue %s", args[0] if args else "")
