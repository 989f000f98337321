"""A worker that cannot sandbox: its start-up probe, and admissions it cannot run (the model
waits with a reason, for a worker that can, then is refused). In process, on a real database;
tests/integration/test_no_sandbox.py runs the same with the real gateway and worker."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from subprocess import Popen

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Model, WorkerHeartbeat, utcnow
from service.settings import Settings
from tests.workers.conftest import add_model, celery_worker_argv, wait_for, worker_env
from workers.execution import heartbeat, sandbox_check
from workers.execution.admission_job import execute_admission
from workers.execution.heartbeat import SandboxState, sandbox_state, set_sandbox_state
from workers.execution.sandbox_check import (
    REPROBE_SECONDS,
    check_sandbox,
    current_state,
    watch_sandbox,
)

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def here(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This test process as a worker named here@test; its sandbox state is forgotten after."""
    monkeypatch.setattr(heartbeat, "_worker_name", "here@test")
    yield "here@test"
    set_sandbox_state(None)


def _without_bwrap(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"bwrap": str(tmp_path / "no-such-bwrap")})


def _beat(session: Session, name: str, sandbox: str | None, age: float = 0.0) -> None:
    session.merge(
        WorkerHeartbeat(
            name=name,
            hostname="test",
            pid=1,
            last_seen=utcnow() - timedelta(seconds=age),
            sandbox=sandbox,
        )
    )
    session.commit()


def _age(session: Session, model: Model, seconds: float) -> None:
    row = session.get(Model, model.id)
    assert row is not None
    row.created_at = utcnow() - timedelta(seconds=seconds)
    session.commit()


def test_the_start_up_probe_says_why_in_the_log_and_in_the_state(
    settings: Settings, tmp_path: Path, here: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = check_sandbox(_without_bwrap(settings, tmp_path), here)
    assert state.status == "unavailable" and state.problem is not None
    assert "no-such-bwrap" in state.problem and sandbox_state() == state
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage().startswith(f"worker {here} cannot sandbox models: bubblewrap")
    assert "rejected 600 s after its upload" in record.getMessage()

    off = check_sandbox(settings.model_copy(update={"sandbox": "off"}), here)
    assert (off.status, off.works) == ("off", True)


def test_a_worker_that_cannot_sandbox_leaves_the_model_to_one_that_can_then_refuses_it(
    settings: Settings, session: Session, tmp_path: Path, here: str
) -> None:
    """Its probe failed: it does not try the model (no attempt, no job directory), gives it a
    reason while another live worker can sandbox, and refuses it once it has waited
    sandbox_wait_seconds since its upload."""
    settings = _without_bwrap(settings, tmp_path)
    check_sandbox(settings, here)
    _beat(session, here, "unavailable")
    _beat(session, "there@test", "bwrap")
    _beat(session, "gone@test", "bwrap", age=600)  # stale: not counted
    model = add_model(session, settings, status="validating")

    assert execute_admission(model.id, settings=settings, session=session) == "sandbox-unavailable"
    row = session.get(Model, model.id, populate_existing=True)
    assert row is not None and row.status == "validating"
    assert row.reason is not None
    assert row.reason.startswith("waiting for a worker that can sandbox models: the one that")
    assert "1 live worker(s) can; refused at " in row.reason
    assert not row.admission_info and not list(settings.jobs_dir.glob("*"))

    _age(session, model, settings.sandbox_wait_seconds + 1)
    assert execute_admission(model.id, settings=settings, session=session) == "rejected"
    row = session.get(Model, model.id, populate_existing=True)
    assert row is not None and row.status == "rejected" and row.reason is not None
    assert row.reason.startswith("no worker that can sandbox models took it within 600 s")


def test_when_no_worker_can_sandbox_the_reason_says_so_and_the_wait_is_bounded(
    settings: Settings, session: Session, tmp_path: Path, here: str
) -> None:
    settings = _without_bwrap(settings, tmp_path).model_copy(update={"sandbox_wait_seconds": 30.0})
    check_sandbox(settings, here)
    _beat(session, here, "unavailable")
    model = add_model(session, settings, status="validating")
    assert execute_admission(model.id, settings=settings, session=session) == "sandbox-unavailable"
    row = session.get(Model, model.id, populate_existing=True)
    assert row is not None and row.reason is not None
    assert row.reason.startswith(
        "no worker can sandbox models: bubblewrap is missing or not working on every live worker"
    )
    _age(session, model, 31)
    assert execute_admission(model.id, settings=settings, session=session) == "rejected"
    row = session.get(Model, model.id, populate_existing=True)
    assert row is not None and row.reason is not None
    assert "and the model waited 30 s for one" in row.reason


@pytest.mark.needs("bwrap")
def test_a_worker_probes_again_before_an_admission_once_bubblewrap_may_be_back(
    settings: Settings, here: str
) -> None:
    """bubblewrap installed after the worker started: no restart needed."""
    old = time.monotonic() - REPROBE_SECONDS - 1
    set_sandbox_state(dataclasses.replace(SandboxState("unavailable", "gone"), checked_at=old))
    state = current_state(settings)
    assert state is not None and state.status == "bwrap" and sandbox_state() == state
    # a recent failure is trusted: no probe per admission
    recent = SandboxState("unavailable", "gone")
    set_sandbox_state(recent)
    assert current_state(settings) is recent


@pytest.mark.needs("bwrap")
def test_a_worker_whose_sandbox_failed_probes_again_on_its_own(
    settings: Settings, here: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No upload needed: the heartbeat (and /readyz) follow a fixed host by themselves."""
    monkeypatch.setattr(sandbox_check, "REPROBE_SECONDS", 0.4)
    set_sandbox_state(SandboxState("unavailable", "gone"))
    stop = threading.Event()
    watcher = watch_sandbox(settings, stop)
    try:
        wait_for(lambda: (s := sandbox_state()) is not None and s.works, timeout=20)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert not watcher.is_alive()


@pytest.mark.needs("bwrap")
@pytest.mark.parametrize("bwrap", ["bwrap", "/nonexistent/bwrap"])
def test_a_real_worker_reports_its_sandbox_in_its_heartbeat(
    bwrap: str,
    settings: Settings,
    session: Session,
    redis_client: redis.Redis,
    start_process: Callable[..., Popen[bytes]],
) -> None:
    """A Celery worker probes bubblewrap when it starts (TIGHTROPE_BWRAP names the binary)
    and every heartbeat row carries the outcome."""
    env = {**worker_env(settings, "workers.sandbox.runner"), "TIGHTROPE_BWRAP": bwrap}
    start_process(celery_worker_argv("probed"), env)

    def row() -> tuple[str | None, str | None] | None:
        session.commit()  # a fresh snapshot
        found = session.execute(
            select(WorkerHeartbeat.sandbox, WorkerHeartbeat.sandbox_problem).where(
                WorkerHeartbeat.name == "probed@test"
            )
        ).first()
        return (found[0], found[1]) if found else None

    status, problem = wait_for(row, timeout=60)
    if bwrap == "bwrap":
        assert (status, problem) == ("bwrap", None)
    else:
        assert status == "unavailable" and problem is not None
        assert "'/nonexistent/bwrap' (TIGHTROPE_BWRAP)) is not installed" in problem
