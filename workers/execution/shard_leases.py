"""The fair choice of which shard a worker runs next, and its claim.

A shard message names no shard: it is a token that makes one worker of a queue run one shard,
and the database picks which (docs/architecture.md, "Shards: one audit over many workers").
The tenant with the fewest shards running goes first; between tenants running as many, the
higher priority, then the older audit; within a tenant, its higher-priority audits first, then
the oldest, in plan order.
So a tenant's 200-shard audit cannot hold back another tenant's 2-shard audit for more than
the shard each worker is running. Taking a shard is one conditional UPDATE, committed at once
(service.db.lifecycle.take_shard, with the shard's renewal, release and expiry), so two
workers cannot both take a shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from service.db.lifecycle import take_shard
from service.db.tables import Audit, AuditShard

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}
CANDIDATE_AUDITS = 8
NEVER = datetime.min.replace(
    tzinfo=UTC
)  # audits tried per claim when other workers take their shards first


@dataclass(frozen=True)
class ClaimedShard:
    audit_id: str
    shard_id: str
    attempts: int


def _waiting(queue: str) -> Any:
    return and_(
        AuditShard.queue == queue,
        AuditShard.status == "queued",
        Audit.status == "running",
        Audit.cancel_requested.is_(False),
    )


def _running_per_tenant(session: Session, now: datetime) -> dict[str, int]:
    rows = session.execute(
        select(Audit.tenant_id, func.count())
        .select_from(AuditShard)
        .join(Audit, Audit.id == AuditShard.audit_id)
        .where(AuditShard.status == "running", AuditShard.lease_expires_at >= now)
        .group_by(Audit.tenant_id)
    )
    return {tenant: int(count) for tenant, count in rows}


def _last_served_per_tenant(session: Session) -> dict[str, datetime]:
    """When each tenant with a live audit last had a shard taken (its newest lease start)."""
    rows = session.execute(
        select(Audit.tenant_id, func.max(AuditShard.started_at))
        .select_from(AuditShard)
        .join(Audit, Audit.id == AuditShard.audit_id)
        .where(Audit.status == "running", AuditShard.started_at.is_not(None))
        .group_by(Audit.tenant_id)
    )
    return {tenant: when for tenant, when in rows if when is not None}


def fair_order(session: Session, queue: str, now: datetime) -> list[str]:
    """Audits with shards waiting in `queue`, the one whose shard should run next first."""
    audits = session.execute(
        select(Audit.id, Audit.tenant_id, Audit.priority, Audit.created_at)
        .join(AuditShard, AuditShard.audit_id == Audit.id)
        .where(_waiting(queue))
        .distinct()
    ).all()
    running = _running_per_tenant(session, now)
    served = _last_served_per_tenant(session)
    best_in_tenant: dict[str, tuple[int, datetime]] = {}
    for _, tenant, priority, created in audits:
        key = (PRIORITY_RANK.get(priority, 1), created)
        best_in_tenant[tenant] = min(best_in_tenant.get(tenant, key), key)
    ordered = sorted(
        audits,
        key=lambda row: (
            running.get(row.tenant_id, 0),
            # Between tenants running as many (with one worker: none, at every claim), the one
            # served longest ago: so tenants take turns shard by shard.
            served.get(row.tenant_id, NEVER),
            best_in_tenant[row.tenant_id],
            row.tenant_id,
            PRIORITY_RANK.get(row.priority, 1),
            row.created_at,
            row.id,
        ),
    )
    return [row.id for row in ordered]


def claim_shard(
    session: Session, queue: str, owner: str, *, now: datetime, lease_seconds: float
) -> ClaimedShard | None:
    """Lease the fairest waiting shard of `queue` for `owner` (attempts + 1); None if none."""
    for audit_id in fair_order(session, queue, now)[:CANDIDATE_AUDITS]:
        shard_ids = session.scalars(
            select(AuditShard.shard_id)
            .where(
                AuditShard.audit_id == audit_id,
                AuditShard.queue == queue,
                AuditShard.status == "queued",
            )
            .order_by(AuditShard.position)
            .limit(4)
        ).all()
        for shard_id in shard_ids:
            if take_shard(session, audit_id, shard_id, owner, now=now, lease_seconds=lease_seconds):
                attempts = session.scalar(
                    select(AuditShard.attempts).where(
                        AuditShard.audit_id == audit_id, AuditShard.shard_id == shard_id
                    )
                )
                return ClaimedShard(audit_id, shard_id, int(attempts or 1))
    return None
