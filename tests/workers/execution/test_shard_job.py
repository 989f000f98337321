"""Shards as tasks, in process, on real databases with real sandboxed children (fake runner
modules): the fair choice of the next shard, retries, errors, cancellation, the tenant's
share of running audits, and the reconciler's shard rules."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.lifecycle import release_shard
from service.db.tables import Audit, AuditShard, Model, utcnow
from service.settings import Settings
from tests.workers.conftest import add_audit, add_model, wait_for
from tests.workers.execution.test_audit_job import Recorded
from workers.execution.audit_job import execute_audit
from workers.execution.job_dir_cache import JobDirCache
from workers.execution.reconciler import reconcile_once
from workers.execution.shard_job import execute_shard
from workers.execution.shard_leases import claim_shard
from workers.execution.steps import end_unleased_audit

pytestmark = pytest.mark.needs("bwrap")  # real sandboxed children

CPU = "tightrope.cpu"


def _with(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update=changes)


def planned_audit(session: Session, model: Model, shards: int, **values: Any) -> Audit:
    """An audit as a worker leaves it after planning: running, unleased, its shards queued."""
    values.setdefault("started_at", utcnow())
    audit = add_audit(session, model, status="running", shards_total=shards, **values)
    for index in range(shards):
        session.add(
            AuditShard(
                audit_id=audit.id,
                shard_id=f"random_noise-{index}",
                status="queued",
                queue=CPU,
                position=index,
                check_index=0,
                kind="random_noise",
                enqueued_at=utcnow(),
            )
        )
    session.commit()
    return audit


def other_tenant_model(session: Session, settings: Settings) -> Model:
    return add_model(session, settings)  # add_model makes a new tenant each time


def shard_rows(session: Session, audit_id: str) -> dict[str, str]:
    rows = session.execute(
        select(AuditShard.shard_id, AuditShard.status).where(AuditShard.audit_id == audit_id)
    )
    return dict(rows.all())


def _audit(session: Session, audit_id: str) -> Audit:
    row = session.get(Audit, audit_id, populate_existing=True)
    assert row is not None
    return row


def test_shards_of_two_tenants_interleave_and_priority_orders_a_tenants_audits(
    settings: Settings, session: Session
) -> None:
    big = planned_audit(session, add_model(session, settings), 200)
    small = planned_audit(session, other_tenant_model(session, settings), 2)
    now = utcnow()
    claimed = [
        claim_shard(session, CPU, f"worker-{i}", now=now, lease_seconds=60) for i in range(5)
    ]
    order = [c.audit_id if c is not None else None for c in claimed]
    # The big audit is older, yet the small one's two shards start among the first four.
    assert order[:4] == [big.id, small.id, big.id, small.id]
    assert order[4] == big.id  # nothing else waits
    assert [c.shard_id for c in claimed if c and c.audit_id == small.id] == [
        "random_noise-0",
        "random_noise-1",
    ]

    model = add_model(session, settings)
    low = planned_audit(session, model, 1, priority="low")
    high = planned_audit(session, model, 1, priority="high")
    first = claim_shard(session, CPU, "w-high", now=now, lease_seconds=60)
    assert first is not None and first.audit_id == high.id  # newer, but higher priority
    second = claim_shard(session, CPU, "w-low", now=now, lease_seconds=60)
    assert second is not None and second.audit_id == low.id


def test_with_one_worker_tenants_take_turns_shard_by_shard(
    settings: Settings, session: Session
) -> None:
    """One worker: at every claim no tenant has a shard running; the tenant served longest ago
    goes next, so a 2-shard audit is not left behind a 6-shard one."""
    big = planned_audit(session, add_model(session, settings), 6)
    small = planned_audit(session, other_tenant_model(session, settings), 2)
    order = []
    for step in range(8):
        now = utcnow() + timedelta(seconds=step)
        claimed = claim_shard(session, CPU, f"the-worker-{step}", now=now, lease_seconds=60)
        assert claimed is not None
        order.append({big.id: "big", small.id: "small"}[claimed.audit_id])
        assert release_shard(
            session, claimed.audit_id, claimed.shard_id, f"the-worker-{step}", status="done"
        )
    assert order == ["big", "small", "big", "small", "big", "big", "big", "big"]


def test_lost_tokens_are_resent_only_for_the_shortfall(
    settings: Settings, session: Session
) -> None:
    model = add_model(session, settings)
    now = utcnow()
    audit = planned_audit(session, model, 3, enqueued_at=None)
    old = now - timedelta(seconds=settings.requeue_after_seconds + 5)
    for row in session.scalars(select(AuditShard).where(AuditShard.audit_id == audit.id)):
        row.enqueued_at = old
    session.commit()
    tokens: list[tuple[object, ...]] = []
    result = reconcile_once(
        session,
        now,
        settings=settings,
        enqueue_shards=lambda *a: tokens.append(a),
        count_tokens=lambda queue: 2,  # two of the three tokens are still in the broker
    )
    assert len(result.shards) == 1 and tokens == [(audit.id, CPU, "normal", 1)]


def test_a_shard_whose_child_dies_is_retried_then_fails_the_audit(
    settings: Settings, session: Session
) -> None:
    settings = _with(settings, runner_module="tests.workers.fakes.crash", max_attempts=2)
    audit = planned_audit(session, add_model(session, settings), 3)
    sends, cache = Recorded(), JobDirCache(1)
    run = {"settings": settings, "session": session, "sends": sends, "cache": cache}
    assert execute_shard(audit.id, CPU, **run) == "retry"  # type: ignore[arg-type]
    assert sends.sent == [("shards", (audit.id, CPU, "normal", 1))]  # type: ignore[attr-defined]
    assert shard_rows(session, audit.id)["random_noise-0"] == "queued"
    assert execute_shard(audit.id, CPU, **run) == "failed"  # type: ignore[arg-type]
    row = _audit(session, audit.id)
    assert row.status == "failed" and row.error is not None
    assert "gave up after 2 attempts" in row.error["detail"]
    assert "random_noise-0" in row.error["detail"]
    assert set(shard_rows(session, audit.id).values()) == {"cancelled"}
    assert execute_shard(audit.id, CPU, **run) == "idle"  # type: ignore[arg-type]
    cache.clear()


def test_an_error_the_engine_reports_fails_the_audit_at_once(
    settings: Settings, session: Session
) -> None:
    settings = _with(settings, runner_module="tests.workers.fakes.hog", runner_memory_bytes=1 << 30)
    audit = planned_audit(session, add_model(session, settings), 2)
    cache = JobDirCache(0)
    outcome = execute_shard(audit.id, CPU, settings=settings, session=session, cache=cache)
    assert outcome == "failed"
    row = _audit(session, audit.id)
    assert row.status == "failed" and row.error is not None
    assert row.error["type"].endswith("/memory-limit") and row.error["status"] == 422
    assert shard_rows(session, audit.id) == {
        "random_noise-0": "cancelled",
        "random_noise-1": "cancelled",
    }
    assert not any(settings.jobs_dir.iterdir())  # capacity 0 keeps no job directory


def test_cancelling_stops_a_running_shard_and_ends_the_audit(
    settings: Settings, sessions: sessionmaker[Session], session: Session
) -> None:
    settings = _with(settings, runner_module="tests.workers.fakes.sleep")
    audit = planned_audit(session, add_model(session, settings), 2)
    outcome: list[str] = []

    def work() -> None:
        with sessions() as own:
            outcome.append(
                execute_shard(audit.id, CPU, settings=settings, session=own, cache=JobDirCache(0))
            )

    worker = threading.Thread(target=work)
    worker.start()
    wait_for(lambda: shard_rows(session, audit.id)["random_noise-0"] == "running", timeout=30)
    session.get(Audit, audit.id).cancel_requested = True  # type: ignore[union-attr]
    session.commit()
    worker.join(timeout=30)
    assert outcome == ["cancelled"]
    assert _audit(session, audit.id).status == "cancelled"
    assert set(shard_rows(session, audit.id).values()) == {"cancelled"}


def test_a_tenant_over_its_share_of_running_audits_waits_until_one_ends(
    settings: Settings, session: Session
) -> None:
    settings = _with(settings, tenant_max_running_audits=1)
    model = add_model(session, settings)
    running = planned_audit(session, model, 1)
    waiting = add_audit(session, model, queue=CPU, priority="high")
    sends = Recorded()
    assert execute_audit(waiting.id, settings=settings, session=session, sends=sends) == "waiting"
    row = _audit(session, waiting.id)
    assert (row.status, row.attempts, row.lease_owner) == ("queued", 0, None)
    assert sends.sent == []  # type: ignore[attr-defined]

    assert end_unleased_audit(
        session, settings, running.id, sends, status="failed", error={"detail": "x"}
    )
    assert sends.sent == [("audit", (waiting.id, CPU, "high"))]  # type: ignore[attr-defined]


def test_the_reconciler_recovers_dead_shards_lost_tokens_and_lost_finalising(
    settings: Settings, session: Session
) -> None:
    model = add_model(session, settings)
    now = utcnow()
    old = now - timedelta(seconds=settings.requeue_after_seconds + 5)
    audit = planned_audit(session, model, 3)
    rows = {r.shard_id: r for r in session.scalars(select(AuditShard))}
    dead, lost, live = rows["random_noise-0"], rows["random_noise-1"], rows["random_noise-2"]
    dead.status, dead.lease_owner = "running", "dead-worker"
    dead.lease_expires_at = now - timedelta(seconds=1)
    lost.enqueued_at = old
    live.status, live.lease_owner = "running", "live-worker"
    live.lease_expires_at = now + timedelta(seconds=30)
    finished = planned_audit(session, model, 1)
    only = session.get(AuditShard, (finished.id, "random_noise-0"))
    assert only is not None
    only.status, only.result = "done", {"value": 0}
    finished.shards_done, finished.updated_at = 1, old
    session.commit()

    audits: list[tuple[object, ...]] = []
    tokens: list[tuple[object, ...]] = []
    result = reconcile_once(
        session,
        now,
        settings=settings,
        enqueue_audit=lambda *a: audits.append(a),
        enqueue_shards=lambda *a: tokens.append(a),
        count_tokens=lambda queue: None,  # a broker that cannot be asked: every stale shard
    )
    assert sorted(result.shards) == [f"{audit.id}/random_noise-0", f"{audit.id}/random_noise-1"]
    assert tokens == [(audit.id, CPU, "normal", 2)]
    assert result.finalising == [finished.id] and audits == [(finished.id, CPU, "normal")]
    assert shard_rows(session, audit.id) == {
        "random_noise-0": "queued",
        "random_noise-1": "queued",
        "random_noise-2": "running",
    }
    again: list[tuple[object, ...]] = []
    second = reconcile_once(
        session,
        now,
        settings=settings,
        enqueue_audit=lambda *a: again.append(a),
        enqueue_shards=lambda *a: again.append(a),
        count_tokens=lambda queue: None,
    )
    assert again == [] and second.shards == [] and second.finalising == []
