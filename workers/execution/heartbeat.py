"""The worker's pulse: a daemon thread that upserts its `worker_heartbeats` row and runs the
reconciler. Readiness looks at these rows, since a solo worker busy with a task answers no ping.
A row also says whether the worker can sandbox uploaded models (workers.execution.sandbox_check).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import WorkerHeartbeat, utcnow
from service.settings import Settings
from workers.execution.reconciler import reconcile_once

log = logging.getLogger(__name__)

SandboxStatus = Literal["bwrap", "off", "unavailable"]


@dataclass(frozen=True)
class SandboxState:
    """Whether this worker can run uploaded code: "bwrap" (its probe of bubblewrap worked),
    "off" (TIGHTROPE_SANDBOX=off: unconfined) or "unavailable" (`problem` says why)."""

    status: SandboxStatus
    problem: str | None = None
    checked_at: float = field(default_factory=time.monotonic)

    @property
    def works(self) -> bool:
        return self.status != "unavailable"


_current_work: str | None = None
_sandbox: SandboxState | None = None  # None: not probed (a task run outside a worker)
_worker_name: str | None = None


def set_current_work(item_id: str | None) -> None:
    """The audit (or model) this worker is busy with, shown in its heartbeat row."""
    global _current_work
    _current_work = item_id


def set_sandbox_state(state: SandboxState | None) -> None:
    """What this worker's sandbox probe found, carried by every heartbeat from now on."""
    global _sandbox
    _sandbox = state


def sandbox_state() -> SandboxState | None:
    return _sandbox


def worker_name() -> str | None:
    """This process's heartbeat name, once its Heartbeat has started."""
    return _worker_name


def beat(session: Session, name: str) -> None:
    """Upsert this worker's row (update first; insert when it is the first beat)."""
    now = utcnow()
    state = _sandbox
    values = {
        "last_seen": now,
        "pid": os.getpid(),
        "current_audit_id": _current_work,
        "sandbox": state.status if state is not None else None,
        "sandbox_problem": state.problem if state is not None else None,
    }
    updated = session.execute(
        update(WorkerHeartbeat).where(WorkerHeartbeat.name == name).values(**values)
    )
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        session.add(
            WorkerHeartbeat(name=name, hostname=socket.gethostname(), started_at=now, **values)
        )
        try:
            session.commit()
        except IntegrityError:  # another process with the same name inserted it first
            session.rollback()
        return
    session.commit()


def forget(session: Session, name: str) -> None:
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == name))
    session.commit()


class Heartbeat:
    """Beats every heartbeat_seconds, reconciles every reconcile_interval_seconds."""

    def __init__(self, name: str, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.name = name
        self.settings = settings
        self.sessions = sessions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tightrope-heartbeat", daemon=True)

    def start(self) -> None:
        global _worker_name
        _worker_name = self.name
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        try:
            with self.sessions() as session:
                forget(session, self.name)
        except Exception:
            log.exception("could not remove the heartbeat of %s", self.name)

    def _run(self) -> None:
        next_reconcile = time.monotonic()
        while not self._stop.is_set():
            # A database outage must not kill the thread: the next round tries again.
            try:
                with self.sessions() as session:
                    beat(session, self.name)
                    if time.monotonic() >= next_reconcile:
                        next_reconcile = time.monotonic() + self.settings.reconcile_interval_seconds
                        reconcile_once(session, utcnow(), settings=self.settings)
            except Exception:
                log.exception("heartbeat round failed")
            self._stop.wait(self.settings.heartbeat_seconds)
