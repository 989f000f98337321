"""Drive one sandboxed runner child: start it, read its JSON-line events, enforce its deadline.

The parent enforces the wall-clock limit (it kills the child's process group), so the limit
holds whatever the Celery pool (the solo pool ignores Celery's own time limits).
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from schemas.runner import RunnerEvent
from workers.sandbox.bubblewrap import Sandbox, kill_process_group

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 40
MAX_EVENT_BYTES = 1024 * 1024
_EOF = object()


@dataclass
class ChildOutcome:
    returncode: int | None
    timed_out: bool
    killed: bool  # killed by us (cancel, lost lease, deadline)
    stderr_tail: str


class RunnerChild:
    """A running `python -m <runner_module> <job_dir>` under the sandbox."""

    def __init__(
        self,
        sandbox: Sandbox,
        runner_module: str,
        job_dir: Path,
        *,
        time_limit: float,
        use_gpu: bool,
        serve: bool = False,
    ) -> None:
        argv = [sys.executable, "-m", runner_module, str(job_dir.resolve())]
        if serve:  # the child stays after its job and runs the next one when told (next_job)
            argv.append("--serve")
        self.job_dir = job_dir
        self.started = time.monotonic()
        self.deadline = self.started + time_limit
        self.time_limit = time_limit
        self._proc = sandbox.start(argv, job_dir, use_gpu=use_gpu, stdin=serve)
        self._lines: queue.Queue[object] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._timed_out = False
        self._killed = False
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump_stdout, args=(self._proc.stdout,), daemon=True),
            threading.Thread(target=self._pump_stderr, args=(self._proc.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _pump_stdout(self, stream: IO[bytes]) -> None:
        # Lines are capped so that a child cannot exhaust the worker's memory with one line.
        while raw := stream.readline(MAX_EVENT_BYTES):
            if raw.endswith(b"\n"):
                self._lines.put(raw)
            else:
                log.warning("runner wrote an over-long line: skipped")
                while (rest := stream.readline(MAX_EVENT_BYTES)) and not rest.endswith(b"\n"):
                    pass
        self._lines.put(_EOF)

    def _pump_stderr(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self._stderr.append(raw.decode("utf-8", "replace").rstrip())

    def events(self, tick_seconds: float) -> Iterator[RunnerEvent | None]:
        """Yield each event, or None every `tick_seconds` of silence; end when stdout closes.

        Past the deadline the child is killed and the iteration ends.
        """
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self._timed_out = True
                self.kill()
                return
            try:
                item = self._lines.get(timeout=min(tick_seconds, remaining))
            except queue.Empty:
                yield None
                continue
            if item is _EOF:
                return
            assert isinstance(item, bytes)
            event = parse_event(item)
            if event is not None:
                yield event

    def alive(self) -> bool:
        return self._proc.poll() is None and not self._killed

    def next_job(self, time_limit: float) -> bool:
        """Tell a serving child to run the job now in its job.json, within `time_limit`
        seconds from now; False when it cannot be told (it exited)."""
        assert self._proc.stdin is not None
        self.deadline = time.monotonic() + time_limit
        self.time_limit = time_limit
        try:
            self._proc.stdin.write(b"next\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def kill(self) -> None:
        self._killed = True
        kill_process_group(self._proc)

    def finish(self, grace_seconds: float = 10.0) -> ChildOutcome:
        """Wait for the child to exit (killing it after the grace period) and collect it."""
        try:
            returncode: int | None = self._proc.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            returncode = self._proc.wait(timeout=grace_seconds)
        for reader in self._readers:
            reader.join(timeout=2.0)
        return ChildOutcome(
            returncode=returncode,
            timed_out=self._timed_out,
            killed=self._killed,
            stderr_tail="\n".join(self._stderr),
        )


def parse_event(raw: bytes) -> RunnerEvent | None:
    """One stdout line as an event; anything else is logged and skipped (never trusted)."""
    text = raw.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        return RunnerEvent.model_validate(json.loads(text))
    except (ValueError, ValidationError):
        log.warning("runner wrote a line that is not an event: %.200s", text)
        return None
