"""An audit whose stored request no longer validates (stored by an earlier version whose schema
has since changed): both steps fail it at once with `invalid-audit-input`, naming the field,
never retry it and start no runner; a cancel still ends it as cancelled; its ending sends no
callback, and the callback task skips it."""

from __future__ import annotations

from sqlalchemy.orm import Session

from schemas.runner import PlannedShard
from service.db.lifecycle import stage_planned_shards
from service.db.tables import Audit, utcnow
from service.settings import Settings
from tests.workers.conftest import REQUEST, add_audit, add_model
from tests.workers.execution.test_audit_job import Recorded
from workers.execution.audit_job import execute_audit
from workers.execution.callbacks import Delivery, deliver_callback
from workers.execution.job_dir_cache import JobDirCache
from workers.execution.shard_job import execute_shard

# A check kind this version does not know, and a callback the audit asked for.
STALE = dict(REQUEST, checks=[{"kind": "retired_check"}], callback_url="http://127.0.0.1:9/hook")


def _reload(session: Session, audit_id: str) -> Audit:
    audit = session.get(Audit, audit_id, populate_existing=True)
    assert audit is not None
    return audit


def _assert_failed_as_unreadable(audit: Audit) -> None:
    assert audit.status == "failed" and audit.error is not None
    assert audit.error["type"].endswith("invalid-audit-input")
    assert "no longer validates" in audit.error["detail"]
    assert "checks.0" in audit.error["detail"]
    assert audit.id in audit.error["detail"]


def test_the_audit_step_fails_an_unreadable_stored_request_without_retrying(
    settings: Settings, session: Session
) -> None:
    audit = add_audit(session, add_model(session, settings), request=STALE)
    sends = Recorded()

    assert execute_audit(audit.id, settings=settings, session=session, sends=sends) == "failed"

    _assert_failed_as_unreadable(_reload(session, audit.id))
    assert sends.sent == []  # type: ignore[attr-defined]  # no retry, no callback
    outcome = deliver_callback(session, settings, audit.id)
    assert outcome.delivery is Delivery.SKIPPED


def test_a_cancelled_audit_with_an_unreadable_request_ends_cancelled(
    settings: Settings, session: Session
) -> None:
    audit = add_audit(session, add_model(session, settings), request=STALE, cancel_requested=True)

    assert execute_audit(audit.id, settings=settings, session=session, sends=Recorded()) == (
        "cancelled"
    )
    assert _reload(session, audit.id).status == "cancelled"


def test_the_shard_step_fails_an_unreadable_stored_request(
    settings: Settings, session: Session
) -> None:
    audit = add_audit(
        session,
        add_model(session, settings),
        request=STALE,
        status="running",
        started_at=utcnow(),
        shards_total=1,
    )
    shard = PlannedShard(
        shard_id="retired_check-0",
        check_index=0,
        kind="retired_check",
        subject="x",
        start=0,
        stop=1,
    )
    stage_planned_shards(session, audit.id, [shard], "tightrope.cpu", utcnow())
    session.commit()
    sends = Recorded()

    outcome = execute_shard(
        audit.id,
        "tightrope.cpu",
        settings=settings,
        session=session,
        sends=sends,
        cache=JobDirCache(capacity=1),
    )

    assert outcome == "failed"
    _assert_failed_as_unreadable(_reload(session, audit.id))
    assert sends.sent == []  # type: ignore[attr-defined]
