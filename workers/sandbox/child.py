"""Drive one sandboxed runner child: start it, read its JSON-line events, enforce its deadline.

The parent enforces the wall-clock limit (it kills the child's process group), so the limit
holds whatever the Celery pool (the solo pool ignores Celery's own time limits). With a
`stall_limit` it is also the watchdog: a child that writes nothing (no event, no `beat`) for as
long as that allows, once it has written the first line of its job, is killed too, and its
outcome says `stalled`. The runner beats every
BEAT_SECONDS while it works, except while one call of the model runs without returning, and
says the largest batch it called the model on (schemas/runner.py, workers.engine.liveness).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from pydantic import ValidationError

from schemas.runner import RunnerEvent
from workers.sandbox.bubblewrap import Sandbox, kill_process_group

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 40
MAX_EVENT_BYTES = 1024 * 1024
_EOF = object()


class QueryAnswerer(Protocol):
    """Answers a runner's `query` event (workers.execution.query_relay): the reply line for
    the runner's stdin, once the answers are in the job directory."""

    def answer(self, event: RunnerEvent, job_dir: Path) -> bytes: ...


@dataclass
class ChildOutcome:
    returncode: int | None
    timed_out: bool
    killed: bool  # killed by us (cancel, lost lease, deadline, watchdog)
    stderr_tail: str
    stalled: bool = False  # killed by the watchdog: silent for stall_seconds
    stall_seconds: float | None = None  # the silence the watchdog allowed (None: no watchdog)
    largest_batch: int = 0  # the largest batch the runner said it called the model on


@dataclass(frozen=True)
class StallLimit:
    """The watchdog's allowance: how long a runner may write nothing. `seconds_per_input` times
    the largest batch the model was called on (as the runner's beats say), at least `floor`."""

    floor: float
    seconds_per_input: float = 0.0

    def seconds(self, largest_batch: int) -> float:
        return max(self.floor, self.seconds_per_input * largest_batch)


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
        stall_limit: StallLimit | None = None,
        warm: bool = False,
        relay: QueryAnswerer | None = None,
    ) -> None:
        argv = [sys.executable, "-m", runner_module, str(job_dir.resolve())]
        if warm:  # imports the engine, then waits for its first job (begin)
            argv.append("--warm")
        elif serve:  # the child stays after its job and runs the next one when told (next_job)
            argv.append("--serve")
        self.job_dir = job_dir
        self.sandbox = sandbox
        self.runner_module = runner_module
        self.use_gpu = use_gpu
        self.waiting = warm  # a warm child not yet given its first job
        self.started = time.monotonic()
        # A warm child has no deadline until it is given a job.
        self.deadline = math.inf if warm else self.started + time_limit
        self.time_limit = time_limit
        self.stall_limit = stall_limit
        self.last_output = self.started  # when the child last wrote a line (its reader sets it)
        # The watchdog is armed by the runner's first line of a job: before it the child runs
        # only our own code (imports, reading job.json), which a busy machine can slow down far
        # past the watchdog's floor; a model loads and runs only after the first beat.
        self.armed = False
        self.largest_batch = 0  # kept across the jobs of a serving child: same model
        # Who answers the runner's endpoint queries (an endpoint model's job); set per job.
        self.relay = relay
        self._query: threading.Thread | None = None  # the query being answered, if any
        self._stdin_lock = threading.Lock()
        stdin = serve or warm or relay is not None
        self._proc = sandbox.start(argv, job_dir, use_gpu=use_gpu, stdin=stdin)
        self._lines: queue.Queue[object] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._timed_out = False
        self._stalled = False
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
            self.last_output = time.monotonic()
            self.armed = True
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
        """Yield each event, or None every `tick_seconds` of silence and for each `beat`; end
        when stdout closes.

        Past the deadline, or after `stall_seconds` without a line from the child (the
        watchdog), the child is killed and the iteration ends.
        """
        while True:
            now = time.monotonic()
            remaining = self.deadline - now
            if remaining <= 0:
                self._timed_out = True
                self.kill()
                return
            wait = min(tick_seconds, remaining)
            # While the worker answers a query the runner waits on it: not the model's silence.
            allowed = self.stall_seconds if self.armed and not self.querying else None
            if allowed is not None:
                quiet = now - self.last_output
                if quiet >= allowed and self._lines.empty():
                    log.warning(
                        "runner %d wrote nothing for %.1f s (watchdog: %g s): killing it",
                        self.pid,
                        quiet,
                        allowed,
                    )
                    self._stalled = True
                    self.kill()
                    return
                wait = min(wait, max(allowed - quiet, 0.01))
            try:
                item = self._lines.get(timeout=wait)
            except queue.Empty:
                yield None
                continue
            if item is _EOF:
                return
            assert isinstance(item, bytes)
            event = parse_event(item)
            if event is None:
                continue
            if event.event == "query":
                self._answer_query(event)
                yield None
                continue
            if event.event == "beat":
                self._note_batch((event.info or {}).get("largest_batch"))
                yield None
                continue
            yield event

    @property
    def querying(self) -> bool:
        return self._query is not None and self._query.is_alive()

    def _answer_query(self, event: RunnerEvent) -> None:
        """Answer the runner's query in a thread of its own, so that the step's loop keeps
        renewing its lease and noticing cancels while the endpoint takes its time."""
        relay = self.relay
        if relay is None:
            info = event.info or {}
            reply = {"id": info.get("id"), "ok": False, "reason": "this job relays no queries"}
            self._write(json.dumps(reply).encode() + b"\n")
            return

        def answer() -> None:
            line = relay.answer(event, self.job_dir)
            self.last_output = time.monotonic()
            self._write(line)

        self._query = threading.Thread(target=answer, name="query", daemon=True)
        self._query.start()

    def _write(self, line: bytes) -> bool:
        if self._proc.stdin is None or not self.alive():
            return False
        try:
            with self._stdin_lock:
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def wait_for_query(self, timeout: float = 30.0) -> None:
        """Wait for a query still being answered (the step closes its client after it)."""
        if self._query is not None:
            self._query.join(timeout)

    @property
    def stall_seconds(self) -> float | None:
        """The silence the watchdog allows now (None: no watchdog)."""
        if self.stall_limit is None:
            return None
        return self.stall_limit.seconds(self.largest_batch)

    def _note_batch(self, batch: object) -> None:
        # The child's word: a larger batch buys a longer allowance, never past the deadline.
        if isinstance(batch, int) and not isinstance(batch, bool) and batch > self.largest_batch:
            self.largest_batch = batch

    def alive(self) -> bool:
        return self._proc.poll() is None and not self._killed

    def begin(
        self, time_limit: float, *, serve: bool, stall_limit: StallLimit | None = None
    ) -> bool:
        """Give a warm child its first job, now in its job directory: it runs it within
        `time_limit` seconds from now, and stays for further `shards` jobs when `serve`. False
        when it cannot be told (it exited)."""
        assert self.waiting, "begin() is for a warm child's first job"
        self.waiting = False
        self.started = time.monotonic()
        return self._tell(b"serve\n" if serve else b"run\n", time_limit, stall_limit)

    def next_job(self, time_limit: float, stall_limit: StallLimit | None = None) -> bool:
        """Tell a serving child to run the job now in its job.json, within `time_limit`
        seconds from now (and the watchdog's `stall_limit`); False when it cannot be told (it
        exited)."""
        return self._tell(b"next\n", time_limit, stall_limit)

    def _tell(self, line: bytes, time_limit: float, stall_limit: StallLimit | None) -> bool:
        assert self._proc.stdin is not None
        self.armed = False  # until the runner's first line of this job
        self.deadline = time.monotonic() + time_limit
        self.time_limit = time_limit
        self.stall_limit = stall_limit
        self.last_output = time.monotonic()
        return self._write(line)

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
            stalled=self._stalled,
            stall_seconds=self.stall_seconds,
            largest_batch=self.largest_batch,
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
