"""Real worker processes (Celery with a solo pool, under the supervisor) on real Redis:
`tightrope worker` and its workers, recovery from a killed worker and from lost messages."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from subprocess import Popen

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Audit, WorkerHeartbeat, utcnow
from service.queue.broker import QUEUE_ADMISSION, QUEUE_CPU, make_celery
from service.queue.dispatch import Dispatcher
from service.settings import Settings
from tests.workers.conftest import (
    add_audit,
    add_model,
    celery_worker_argv,
    wait_for,
    worker_env,
)

FAKE_RUNNER = "tests.workers.fakes.report"
StartProcess = Callable[[list[str], dict[str, str]], Popen[bytes]]


def _heartbeat_pid(session: Session, name: str) -> int | None:
    session.commit()  # a fresh snapshot
    return session.scalar(select(WorkerHeartbeat.pid).where(WorkerHeartbeat.name == name))


def _status(session: Session, audit_id: str) -> str:
    session.commit()
    return str(session.scalar(select(Audit.status).where(Audit.id == audit_id)))


def _send(settings: Settings, audit_id: str) -> None:
    make_celery(settings).send_task("tightrope.run_audit", args=[audit_id], queue=QUEUE_CPU)


def _heartbeat_pids(session: Session, names: list[str]) -> dict[str, int] | None:
    session.commit()
    rows = session.execute(
        select(WorkerHeartbeat.name, WorkerHeartbeat.pid).where(WorkerHeartbeat.name.in_(names))
    ).all()
    pids = {name: pid for name, pid in rows if pid}
    return pids if len(pids) == len(names) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_tightrope_worker_runs_cpu_workers_and_an_admission_worker_until_sigterm(
    settings: Settings,
    session: Session,
    redis_client: redis.Redis,
    start_process: StartProcess,
) -> None:
    """`tightrope worker --concurrency 2`: two workers of the CPU queue and one of the
    admission queue, each its own Celery process with its own heartbeat; SIGTERM stops all."""
    host = socket.gethostname()
    names = [f"cpu1@{host}", f"cpu2@{host}", f"admission@{host}"]
    supervisor = start_process(
        [
            sys.executable,
            "-m",
            "workers.cli.main",
            "worker",
            "--concurrency",
            "2",
            "--without-mingle",
            "--without-gossip",
        ],
        worker_env(settings, FAKE_RUNNER),
    )
    pids = wait_for(lambda: _heartbeat_pids(session, names), timeout=90)
    assert len(set(pids.values())) == 3 and supervisor.pid not in pids.values()

    # each reads its own queues (asked over Celery's remote control: idle workers answer)
    inspect = make_celery(settings).control.inspect(timeout=5.0, destination=names)
    queues = wait_for(lambda: (r := inspect.active_queues()) and len(r) == 3 and r, timeout=30)
    assert {name: sorted(q["name"] for q in qs) for name, qs in queues.items()} == {
        f"cpu1@{host}": [QUEUE_CPU],
        f"cpu2@{host}": [QUEUE_CPU],
        f"admission@{host}": [QUEUE_ADMISSION],
    }

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0
    assert not any(_alive(pid) for pid in pids.values())
    session.commit()
    assert session.scalars(select(WorkerHeartbeat.name)).all() == []  # clean stops forget rows


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_supervisor_restarts_a_killed_worker_which_then_runs_tasks(
    settings: Settings,
    session: Session,
    redis_client: redis.Redis,
    start_process: StartProcess,
) -> None:
    name = "supervised"
    supervisor = start_process(
        [
            sys.executable,
            "-m",
            "workers.execution.supervisor",
            "--hostname",
            f"{name}@test",
            "--without-mingle",
            "--without-gossip",
        ],
        worker_env(settings, FAKE_RUNNER),
    )
    first_pid = wait_for(lambda: _heartbeat_pid(session, f"{name}@test"), timeout=60)
    os.kill(first_pid, signal.SIGKILL)
    wait_for(
        lambda: (_heartbeat_pid(session, f"{name}@test") or first_pid) != first_pid, timeout=60
    )

    audit = add_audit(session, add_model(session, settings))
    _send(settings, audit.id)
    wait_for(lambda: _status(session, audit.id) == "succeeded", timeout=60)

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0
    assert _heartbeat_pid(session, f"{name}@test") is None  # a clean stop removes the row


def test_lost_messages_and_expired_leases_are_recovered_by_a_worker(
    settings: Settings,
    session: Session,
    redis_client: redis.Redis,
    start_process: StartProcess,
) -> None:
    model = add_model(session, settings)
    now = utcnow()
    # sent, then Redis lost it (flushed): nothing is in the queue for this audit
    lost = add_audit(session, model, enqueued_at=now - timedelta(seconds=30))
    _send(settings, lost.id)
    redis_client.flushdb()
    # its worker died mid-audit: the lease is held by nobody alive
    orphan = add_audit(
        session,
        model,
        status="running",
        attempts=1,
        lease_owner="dead-host:1:abc",
        lease_expires_at=now - timedelta(seconds=1),
        started_at=now - timedelta(seconds=60),
    )
    start_process(celery_worker_argv("reconciling"), worker_env(settings, FAKE_RUNNER))
    wait_for(
        lambda: _status(session, lost.id) == _status(session, orphan.id) == "succeeded",
        timeout=90,
    )
    session.commit()
    for audit in (orphan, lost):
        row = session.get(Audit, audit.id, populate_existing=True)
        assert row is not None
        # Planned afresh (attempts then count the finalising task's tries: one) and run.
        assert (row.attempts, row.shards_done, row.shards_total) == (1, 1, 1)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_dispatchers_audit_message_reaches_a_worker(
    settings: Settings,
    session: Session,
    redis_client: redis.Redis,
    start_process: StartProcess,
) -> None:
    """The one sender (service.queue.dispatch) sends what the worker consumes."""
    start_process(celery_worker_argv("plain"), worker_env(settings, FAKE_RUNNER))
    audit = add_audit(session, add_model(session, settings))
    assert Dispatcher.from_settings(settings).audit(audit.id)
    wait_for(lambda: _status(session, audit.id) == "succeeded", timeout=60)
