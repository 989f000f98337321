"""One attempt at an audit, in process, with real sandboxed children (fake runner modules that
misbehave on purpose) and real databases."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Artifact, Audit, AuditShard, Model
from service.settings import Settings
from tests.workers.conftest import REQUEST, add_audit, add_model, wait_for
from workers.execution.admission_job import execute_admission
from workers.execution.audit_job import Sends, execute_audit
from workers.execution.job_dir_cache import JobDirCache
from workers.execution.shard_job import execute_shard

pytestmark = pytest.mark.needs("bwrap")  # real sandboxed children


def _with(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update=changes)


def _reload(session: Session, audit_id: str) -> Audit:
    audit = session.get(Audit, audit_id, populate_existing=True)
    assert audit is not None
    return audit


class Recorded(Sends):
    """Sends that record (kind, args) instead of reaching a broker."""

    def __init__(self) -> None:
        sent: list[tuple[str, tuple[object, ...]]] = []
        super().__init__(
            audit=lambda *args: sent.append(("audit", args)),
            shards=lambda *args: sent.append(("shards", args)),
            callback=lambda *args: sent.append(("callback", args)),
        )
        object.__setattr__(self, "sent", sent)


def test_an_audit_is_planned_sharded_and_finalised_with_its_artifacts(
    settings: Settings, session: Session
) -> None:
    settings = _with(settings, runner_module="tests.workers.fakes.report")
    request = dict(REQUEST, checks=[{"kind": "random_noise"}, {"kind": "lipschitz"}])
    audit = add_audit(session, add_model(session, settings), request=request)
    sends = Recorded()

    assert execute_audit(audit.id, settings=settings, session=session, sends=sends) == "planned"
    row = _reload(session, audit.id)
    assert (row.status, row.shards_total, row.shards_done, row.lease_owner) == (
        "running",
        2,
        0,
        None,
    )
    assert sends.sent == [("shards", (audit.id, "tightrope.cpu", "normal", 2))]  # type: ignore[attr-defined]
    planned = session.scalars(
        select(AuditShard).where(AuditShard.audit_id == audit.id).order_by(AuditShard.position)
    ).all()
    assert [(s.shard_id, s.status, s.check_index) for s in planned] == [
        ("random_noise-0", "queued", 0),
        ("lipschitz-1", "queued", 1),
    ]

    cache = JobDirCache(capacity=2)
    outcomes = [
        execute_shard(
            audit.id,
            "tightrope.cpu",
            settings=settings,
            session=session,
            worker=f"w{i}",
            sends=sends,
            cache=cache,
        )
        for i in range(3)
    ]
    assert outcomes == ["done", "done", "idle"]
    assert cache.materialised == 1  # the second shard reused the kept job directory
    assert cache.children_started == 1  # ... and the child kept after the first one ran it
    # no shard of the audit is left waiting: the runner ended with the last one
    assert cache.kept_child(next(settings.jobs_dir.iterdir())) is None
    row = _reload(session, audit.id)
    assert (row.shards_done, row.progress_fraction) == (2, 1.0)
    stored = session.scalars(
        select(AuditShard)
        .where(AuditShard.audit_id == audit.id)
        .execution_options(populate_existing=True)
    ).all()
    assert {(s.shard_id, s.status, s.worker) for s in stored} == {
        ("random_noise-0", "done", "w0"),
        ("lipschitz-1", "done", "w1"),
    }
    assert sends.sent[-1] == ("audit", (audit.id, "tightrope.cpu", "normal"))  # type: ignore[attr-defined]

    assert execute_audit(audit.id, settings=settings, session=session, sends=sends) == "succeeded"
    row = _reload(session, audit.id)
    assert (row.status, row.verdict, row.progress_fraction, row.lease_owner) == (
        "succeeded",
        "pass",
        1.0,
        None,
    )
    assert row.report_path == f"{audit.id}/report.json" and row.finished_at is not None
    report = json.loads((settings.artifact_dir / row.report_path).read_text())
    assert report["resumed_shards"] == ["lipschitz-1", "random_noise-0"]  # all handed back
    artifacts = session.scalars(select(Artifact).where(Artifact.audit_id == audit.id)).all()
    assert {(a.name, a.media_type) for a in artifacts} == {
        ("report.json", "application/json"),
        ("figure.png", "image/png"),
    }
    cache.clear()
    assert not any(settings.jobs_dir.iterdir())  # no job directory is left


def test_a_child_that_dies_is_retried_then_given_up(settings: Settings, session: Session) -> None:
    settings = _with(settings, runner_module="tests.workers.fakes.crash", max_attempts=2)
    audit = add_audit(session, add_model(session, settings))
    sends = Recorded()
    assert execute_audit(audit.id, settings=settings, session=session, sends=sends) == "queued"
    resent = [("audit", (audit.id, "tightrope.cpu", "normal"))]
    assert sends.sent == resent and _reload(session, audit.id).lease_owner is None  # type: ignore[attr-defined]
    assert execute_audit(audit.id, settings=settings, session=session, sends=sends) == "failed"
    row = _reload(session, audit.id)
    assert row.attempts == 2 and row.error is not None
    assert "gave up after 2 attempts" in row.error["detail"]
    assert sends.sent == resent  # type: ignore[attr-defined]


def test_the_budget_time_limit_fails_the_audit(settings: Settings, session: Session) -> None:
    settings = _with(settings, runner_module="tests.workers.fakes.sleep")
    request = dict(REQUEST, budget={"wall_seconds": 1.5})
    audit = add_audit(session, add_model(session, settings), request=request)
    started = time.monotonic()
    assert execute_audit(audit.id, settings=settings, session=session) == "failed"
    assert time.monotonic() - started < 20
    row = _reload(session, audit.id)
    assert row.error is not None and row.error["detail"] == (
        "the audit timed out after 1.5 s; the audit's time limit is 1.5 s, set by the audit's "
        "budget.wall_seconds: raise budget.wall_seconds, or audit fewer or smaller images, "
        "fewer levels or restarts"
    )
    assert row.error["extra"] == {"limit_seconds": 1.5, "limit_source": "budget"}
    assert row.error["status"] == 422 and row.progress_message == "sleeping"


def _start_sleeping_audit(
    settings: Settings, sessions: sessionmaker[Session], session: Session
) -> tuple[Audit, threading.Thread, list[str]]:
    """An attempt whose runner sleeps, in a thread of its own, once the runner is running;
    `outcome` receives execute_audit's result when the thread ends."""
    settings = _with(settings, runner_module="tests.workers.fakes.sleep")
    audit = add_audit(session, add_model(session, settings))
    outcome: list[str] = []

    def work() -> None:
        with sessions() as own:
            outcome.append(execute_audit(audit.id, settings=settings, session=own))

    worker = threading.Thread(target=work)
    worker.start()
    wait_for(lambda: _reload(session, audit.id).progress_message == "sleeping", timeout=30)
    return audit, worker, outcome


def test_cancellation_kills_the_child(
    settings: Settings, sessions: sessionmaker[Session], session: Session
) -> None:
    audit, worker, outcome = _start_sleeping_audit(settings, sessions, session)
    session.get(Audit, audit.id).cancel_requested = True  # type: ignore[union-attr]
    session.commit()
    worker.join(timeout=30)
    assert outcome == ["cancelled"]
    assert _reload(session, audit.id).status == "cancelled"


def test_a_lost_lease_stops_the_attempt_without_writing(
    settings: Settings, sessions: sessionmaker[Session], session: Session
) -> None:
    audit, worker, outcome = _start_sleeping_audit(settings, sessions, session)
    session.get(Audit, audit.id).lease_owner = "another-worker"  # type: ignore[union-attr]
    session.commit()
    worker.join(timeout=30)
    assert outcome == ["lease_lost"]
    row = _reload(session, audit.id)
    assert (row.status, row.lease_owner) == ("running", "another-worker")


def test_admission_of_a_model_that_never_returns_is_rejected(
    settings: Settings, session: Session
) -> None:
    settings = _with(settings, runner_module="tests.workers.fakes.sleep", admission_time_limit=2)
    model = add_model(session, settings, status="validating")
    assert execute_admission(model.id, settings=settings, session=session) == "rejected"
    row = session.get(Model, model.id, populate_existing=True)
    assert row is not None and row.reason is not None
    assert row.reason.startswith("timed out after 2 s")


def test_admission_of_a_model_that_blows_the_memory_is_rejected(
    settings: Settings, session: Session
) -> None:
    settings = _with(settings, runner_module="tests.workers.fakes.hog", runner_memory_bytes=1 << 30)
    model = add_model(session, settings, status="validating")
    assert execute_admission(model.id, settings=settings, session=session) == "rejected"
    row = session.get(Model, model.id, populate_existing=True)
    assert row is not None and row.reason is not None
    assert "exceeded the memory limit of 1024 MiB" in row.reason
    # a model that is not validating any more is left alone
    assert execute_admission(model.id, settings=settings, session=session) == "skipped"


def test_a_worker_without_its_sandbox_blames_itself_not_the_model(
    settings: Settings, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bwrap missing on this worker: the model stays `validating` (no attempt spent) and the
    audit is retried elsewhere, never rejected or failed for the user's input."""
    monkeypatch.setattr("workers.sandbox.bubblewrap.shutil.which", lambda name: None)
    settings = _with(settings, sandbox="bwrap", max_attempts=2)
    model = add_model(session, settings, status="validating")
    assert execute_admission(model.id, settings=settings, session=session) == "sandbox-unavailable"
    row = session.get(Model, model.id, populate_existing=True)
    assert row is not None and row.status == "validating"
    assert row.reason is not None and row.reason.startswith("no worker can sandbox models")
    assert (row.admission_info or {}).get("attempts") == 0

    audit = add_audit(session, add_model(session, settings))
    sends = Recorded()
    assert execute_audit(audit.id, settings=settings, session=session, sends=sends) == "queued"
    assert sends.sent == [("audit", (audit.id, "tightrope.cpu", "normal"))]  # type: ignore[attr-defined]
    assert execute_audit(audit.id, settings=settings, session=session, sends=sends) == "failed"
    error = _reload(session, audit.id).error
    assert error is not None and error["type"].endswith("/attempts-exhausted")
    assert "sandbox is unavailable" in error["detail"]


@pytest.mark.parametrize("last", ["plan", "report"])
def test_the_runner_is_ended_at_its_last_word_before_the_step_stores_it(last: str) -> None:
    """A runner's `plan` or `report` comes after its files are written: it is killed then, not
    left exiting (seconds of a core, with torch loaded) beside the report's signing and
    rendering."""
    from schemas.runner import RunnerEvent
    from workers.execution.audit_job import _AuditEvents

    order: list[str] = []

    class Child:
        def kill(self) -> None:
            order.append("kill")

    class Attempt:
        timings: dict[str, float] = {}
        finished = False

        def handle(self, event: RunnerEvent) -> None:
            order.append(event.event)
            self.finished = event.event == last

    events = _AuditEvents(Attempt(), Child())  # type: ignore[arg-type]
    assert not events.on_event(RunnerEvent(event="shard", shard_id="s", file="shards/s.json"))
    assert events.on_event(RunnerEvent(event=last, file="out/x.json"))  # type: ignore[arg-type]
    assert order == ["shard", "kill", last]
