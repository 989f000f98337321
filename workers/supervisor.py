"""Keep one Celery worker alive: restart it whenever it exits, until told to stop.

A worker can die under us (a Redis restart crashes it, the OOM killer, a SIGKILL); the database
keeps the truth, so a fresh worker plus the reconciler is all recovery needs. SIGTERM/SIGINT are
forwarded to the worker (a warm shutdown: the running task finishes); a second one forwards
SIGQUIT (cold shutdown: the task's lease then expires and the reconciler re-enqueues it).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from service.queue import QUEUE
from workers.sandbox import set_parent_death_signal

log = logging.getLogger(__name__)

INITIAL_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
HEALTHY_RUN_SECONDS = 60.0  # a worker that ran this long resets the backoff


def worker_command(argv: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "-Q",
        QUEUE,
        *argv,
    ]


class Supervisor:
    def __init__(self, argv: Sequence[str]) -> None:
        self.command = worker_command(argv)
        self.child: subprocess.Popen[bytes] | None = None
        self.stop_signals = 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signals += 1
        forward = signum if self.stop_signals == 1 else signal.SIGQUIT
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(forward)

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        backoff = INITIAL_BACKOFF_SECONDS
        while True:
            started = time.monotonic()
            # The worker dies with the supervisor, so a killed supervisor leaves no orphan.
            self.child = subprocess.Popen(self.command, preexec_fn=set_parent_death_signal)
            log.info("started celery worker pid %d", self.child.pid)
            code = self.child.wait()
            if self.stop_signals:
                return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
            if time.monotonic() - started >= HEALTHY_RUN_SECONDS:
                backoff = INITIAL_BACKOFF_SECONDS
            log.warning("celery worker exited with %s; restarting in %.0f s", code, backoff)
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not self.stop_signals:
                time.sleep(0.1)
            if self.stop_signals:
                return 0
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)


def supervise(argv: Sequence[str]) -> int:
    """Run `celery worker` with extra arguments `argv` and restart it until SIGTERM/SIGINT."""
    return Supervisor(argv).run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(supervise(sys.argv[1:]))
