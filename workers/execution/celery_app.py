"""The worker-side Celery app: the shared configuration, the task modules to load and signals.

Started as `celery -A workers.execution.celery_app worker` (by workers.execution.supervisor).
Imports no torch.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from service.db.session import get_sessionmaker
from service.queue.broker import make_celery
from service.settings import get_settings
from workers.execution.heartbeat import Heartbeat

app = make_celery(get_settings())
# The worker imports the task modules when it starts (they import `app` from here, never the
# other way round: one registration, no import circle).
app.conf.imports = ("workers.execution.tasks",)
# One line per endpoint query at INFO would drown what the worker says: its failures are logged
# by the client and counted in the audit's ledger.
logging.getLogger("httpx").setLevel(logging.WARNING)
# A solo worker runs one task at a time; the audit itself runs in a child process.
app.conf.worker_concurrency = 1

_heartbeat: Heartbeat | None = None


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    # Imported here: it needs the task modules' dependencies, which this module must not load.
    from workers.execution.sandbox_check import check_sandbox, watch_sandbox
    from workers.execution.warm_runner import start_spare

    name = getattr(sender, "hostname", None) or "worker"
    settings = get_settings()
    # Before the first beat, so that every heartbeat says whether this worker can sandbox.
    check_sandbox(settings, name)
    watch_sandbox(settings)
    # The first job's runner imports the engine while the worker waits for that job.
    start_spare(settings)
    _heartbeat = Heartbeat(name, settings, get_sessionmaker())
    _heartbeat.start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    from workers.execution.warm_runner import end_spare

    end_spare()
    if _heartbeat is not None:
        _heartbeat.stop()
