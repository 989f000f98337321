"""The sandboxed child: `python -m workers.sandbox.runner <job_dir> [--serve|--warm]`.

`--serve`: after a `shards` job, run the next one each time the worker writes a line on stdin.
`--warm`: import the engine first, then wait on stdin for the worker to put a job into the
(empty, private) job directory and say `run` or `serve` (workers.execution.warm_runner).

Reads `job.json` (schemas.runner.RunnerRequest), calls the engine, and reports on stdout one JSON
line per schemas.runner.RunnerEvent. Anything the engine or the model prints goes to stderr:
the event stream lives on a private copy of the original stdout, so it cannot be forged or
corrupted by prints. Every failure, including a MemoryError, ends in an `error` event and exit
code 1; the parent never has to interpret a bare traceback.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from schemas.runner import (
    BEAT_SECONDS,
    JOB_FILE,
    MAX_SHARDS,
    OUT_DIR,
    PLAN_FILE,
    SHARDS_DIR,
    STOP_FILE,
    RunnerEvent,
    RunnerPlan,
    RunnerRequest,
)

# torch-free at module level: the model-call counter the beat reads, and the shared error
# classes and archive limits (the engine itself is imported by each job's function)
from workers.engine.liveness import MODEL_CALLS, ModelCalls
from workers.shared.errors import EndpointQueryFailed, EngineInputError, is_out_of_memory
from workers.shared.limits import archive_limits_in_force

REPORT_FILE = "report.json"
# The status a failure maps to: 422 when the audit's own input is at fault.
INPUT_ERROR_STATUS = 422
INTERNAL_ERROR_STATUS = 500
ENDPOINT_ERROR_STATUS = 502


class EventStream:
    """Writes events as JSON lines to a private descriptor, flushing each (one line at a time:
    the beat thread writes too)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        line = RunnerEvent(event=event, **fields).model_dump_json(exclude_none=True)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class Beats:
    """While a job runs, a `beat` event every `interval` seconds, unless one call of the model
    has been running since the last beat without returning (the engine counts the calls in
    MODEL_CALLS); and one at once when a call starts on a larger batch than any before, which
    the worker's watchdog allows more time. The watchdog stops a shard whose runner stays
    silent too long: a model that never returns is so told apart from a long audit, which
    keeps beating."""

    def __init__(
        self, events: EventStream, interval: float = BEAT_SECONDS, calls: ModelCalls = MODEL_CALLS
    ) -> None:
        self._events = events
        self._interval = interval
        self._calls = calls
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="beats", daemon=True)

    def __enter__(self) -> Beats:
        self._calls.on_larger_batch = lambda batch: self.emit()
        self.emit()  # at once: the job started
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._calls.on_larger_batch = None
        self._stop.set()
        self._thread.join()

    def emit(self) -> None:
        calls = self._calls
        info = {"model_calls": calls.completed, "largest_batch": calls.largest_batch}
        self._events.emit("beat", info=info)

    def _beat(self) -> None:
        seen = self._calls.completed
        while not self._stop.wait(self._interval):
            completed, running = self._calls.completed, self._calls.running_since
            if running is None or completed != seen:
                seen = completed
                self.emit()


def take_over_stdout() -> EventStream:
    """Keep the real stdout for events and point fd 1 (and sys.stdout) at stderr."""
    private_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return EventStream(os.fdopen(private_fd, "w", encoding="utf-8", buffering=1))


def load_completed_shards(job_dir: Path) -> dict[str, dict[str, Any]]:
    shards: dict[str, dict[str, Any]] = {}
    shard_dir = job_dir / SHARDS_DIR
    if shard_dir.is_dir():
        for path in sorted(shard_dir.glob("*.json")):
            shards[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return shards


def run_admission(job: RunnerRequest, job_dir: Path, events: EventStream) -> None:
    from workers.engine import entry_points

    if job.model_format == "endpoint":  # the worker probes endpoints itself
        raise ValueError("an endpoint model is admitted by the worker, not a runner")
    admission = entry_points.admit_model(
        job_dir / job.model_file, job.model_format, job.spec, device="cpu"
    )
    if admission.ok:
        events.emit("admitted", info=admission.info)
    else:
        events.emit("rejected", reason=admission.reason or "rejected", info=admission.info)


# model file → the loaded model, for a child that serves several `shards` jobs (--serve)
_LOADED: dict[str, Any] = {}


def serve_next_jobs(job_dir: Path, events: EventStream) -> None:
    """--serve: after the first job, run the job in job.json again each time the worker
    writes a line to stdin; end at end of input (the worker closed it, or died)."""
    while sys.stdin.readline():
        job = RunnerRequest.model_validate_json((job_dir / JOB_FILE).read_text(encoding="utf-8"))
        if job.kind != "shards":
            raise ValueError("a serving runner runs `shards` jobs only")
        run_audit(job, job_dir, events)


def run_plan(job: RunnerRequest, job_dir: Path, events: EventStream) -> None:
    from workers.engine import entry_points

    if job.config is None:
        raise ValueError("job.json: a plan job needs a config")
    probe = _probe_before_planning(job, job_dir, events)
    if probe is None:
        return
    shards = entry_points.plan_audit(
        job.spec, job.config, job_dir, compare=job.reference is not None
    )
    if len(shards) > MAX_SHARDS:
        raise EngineInputError(
            f"the audit splits into {len(shards)} shards, more than {MAX_SHARDS}: raise "
            "budget.images_per_shard or audit fewer images"
        )
    out_dir = job_dir / OUT_DIR
    out_dir.mkdir(exist_ok=True)
    plan = RunnerPlan.model_validate({"shards": shards})
    (out_dir / PLAN_FILE).write_text(plan.model_dump_json(), encoding="utf-8")
    events.emit("plan", file=f"{OUT_DIR}/{PLAN_FILE}", info={"shards": len(shards), **probe})


def _probe_before_planning(
    job: RunnerRequest, job_dir: Path, events: EventStream
) -> dict[str, Any] | None:
    """The model's probe through the audit's operator; None (and an error event naming the
    model) when the model fails it. The worker gives the plan child the probe's short time
    limit, so a model that never returns costs that much and no more."""
    from workers.engine.audit_probe import probe_for_audit
    from workers.engine.rejection import ModelRejected

    assert job.config is not None
    try:
        facts = probe_for_audit(
            job_dir / job.model_file, job.model_format, job.spec, job.config, job_dir
        )
    except ModelRejected as exc:
        events.emit(
            "error",
            message="The model failed its probe",
            reason=exc.reason,
            info={"status": INPUT_ERROR_STATUS, "cause": "model"},
        )
        return None
    return {"probe": facts}


def run_audit(job: RunnerRequest, job_dir: Path, events: EventStream) -> None:
    from workers.engine import entry_points

    if job.config is None:
        raise ValueError("job.json: an audit job needs a config")
    out_dir = job_dir / OUT_DIR
    shard_dir = job_dir / SHARDS_DIR
    out_dir.mkdir(exist_ok=True)
    shard_dir.mkdir(exist_ok=True)

    def on_progress(fraction: float, check: str | None, message: str | None) -> None:
        events.emit("progress", fraction=min(max(fraction, 0.0), 1.0), check=check, message=message)

    def on_shard(shard_id: str, result: dict[str, Any]) -> None:
        # Written to a temporary name first: the parent reads the file when it sees the event.
        path = shard_dir / f"{shard_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result), encoding="utf-8")
        tmp.replace(path)
        events.emit("shard", shard_id=shard_id, file=f"{SHARDS_DIR}/{shard_id}.json")

    with Beats(events):
        report = entry_points.run_audit(
            job_dir / job.model_file,
            job.model_format,
            job.spec,
            job.config,
            # A serving child keeps the model it loaded for the next shards of the same audit.
            loaded=_LOADED if job.kind == "shards" else None,
            out_dir=out_dir,
            model_sha256=job.model_sha256,
            audit_id=job.audit_id,
            model_id=job.model_id,
            base_dir=job_dir,
            completed_shards=load_completed_shards(job_dir),
            on_progress=on_progress,
            on_shard=on_shard,
            # The worker asks a running child to stop by creating STOP in its job directory.
            should_stop=(job_dir / STOP_FILE).exists,
            only_shards=job.shard_ids if job.kind == "shards" else None,
            reference=job.reference,
        )
    if job.kind == "shards":
        events.emit("done", info={"shards": report.get("shards", [])})
        return
    # the engine wrote out/report.json (workers.engine.report.write_report)
    events.emit("report", file=f"{OUT_DIR}/{REPORT_FILE}", info={"verdict": report.get("verdict")})


def is_input_error(exc: BaseException) -> bool:
    """The audit's own input (or model) is at fault: 422. Anything else — a plain ValueError or
    KeyError included — is an engine bug: 500, so it is fixed rather than blamed on the user."""
    return isinstance(exc, EngineInputError | ValidationError | FileNotFoundError)


def describe_failure(exc: BaseException) -> dict[str, Any]:
    """The error event's fields: a title, a detail a person can act on, and the status."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return {
            "message": "Storage full",
            "reason": f"{type(exc).__name__}: {exc}",
            "info": {"status": INTERNAL_ERROR_STATUS, "cause": "storage"},
        }
    if isinstance(exc, EndpointQueryFailed):
        spent = exc.budget_spent
        return {
            "message": "Query budget spent" if spent else "Endpoint failed",
            "reason": str(exc),
            "info": {
                "status": INPUT_ERROR_STATUS if spent else ENDPOINT_ERROR_STATUS,
                "cause": "query-budget" if spent else "endpoint",
            },
        }
    if is_out_of_memory(exc):
        return {
            "message": "Memory limit exceeded",
            "reason": "exceeded the memory limit",
            "info": {"status": INPUT_ERROR_STATUS, "cause": "memory"},
        }
    if is_input_error(exc):
        return {
            "message": "Invalid audit input",
            "reason": f"{type(exc).__name__}: {exc}",
            "info": {"status": INPUT_ERROR_STATUS, "cause": "input"},
        }
    return {
        "message": "Internal error in the audit engine",
        "reason": f"{type(exc).__name__}: {exc}",
        "info": {"status": INTERNAL_ERROR_STATUS, "cause": "internal"},
    }


# What a warm runner imports before it is given a job: everything a job of any kind needs,
# so that its job starts at once (torch and deepinv alone take seconds to import).
WARM_IMPORTS = (
    "torch",
    "deepinv",
    "workers.engine.entry_points",
    "workers.engine.audit",
    "workers.engine.audit_probe",
    "workers.engine.admission_result",
    "workers.engine.model_loading",
    "workers.engine.operators",
    "workers.shared.panels",
    "scipy.stats",
    # the reconstruction checks most audits name; the classifier attacks' libraries are
    # imported by the audits that need them
    "workers.engine.checks.random_noise",
    "workers.engine.checks.worst_case",
    "workers.engine.checks.lipschitz",
    "workers.engine.checks.false_negative",
    "workers.engine.checks.false_positive",
)


def warm_up() -> None:
    for name in WARM_IMPORTS:
        importlib.import_module(name)


def wait_for_first_job() -> bool | None:
    """--warm: import what jobs need, then wait for the worker to write the job into this
    child's (empty until then) job directory and say `run` or `serve` on stdin. True: serve
    (run further `shards` jobs when told); None: the worker closed stdin (no job will come)."""
    warm_up()
    line = sys.stdin.readline()
    if not line:
        return None
    return line.strip() == "serve"


def relay_queries(job_dir: Path, events: EventStream) -> None:
    """An endpoint model's job: the engine's EndpointModule asks the worker, which queries the
    endpoint for it (workers.sandbox.query_relay); the runner itself has no network."""
    from workers.engine.endpoint_model import install_query_client
    from workers.sandbox.query_relay import RelayedQueries

    install_query_client(RelayedQueries(job_dir, events, sys.stdin))


def main(argv: list[str]) -> int:
    events = take_over_stdout()
    try:
        mode = argv[1:]
        if len(argv) < 1 or mode not in ([], ["--serve"], ["--warm"]):
            raise ValueError("usage: python -m workers.sandbox.runner <job_dir> [--serve|--warm]")
        serve = mode == ["--serve"]
        if mode == ["--warm"]:
            told = wait_for_first_job()
            if told is None:
                return 0
            serve = told
        job_dir = Path(argv[0])
        job = RunnerRequest.model_validate_json((job_dir / JOB_FILE).read_text(encoding="utf-8"))
        if job.model_format == "endpoint":
            relay_queries(job_dir, events)
        # every archive the engine reads is held to the gateway's limits, which the job carries
        with archive_limits_in_force(job.archive_limits):
            if job.kind == "admit":
                run_admission(job, job_dir, events)
            elif job.kind == "plan":
                run_plan(job, job_dir, events)
            else:
                run_audit(job, job_dir, events)
                if serve and job.kind == "shards":
                    serve_next_jobs(job_dir, events)
        return 0
    except BaseException as exc:  # every failure must become an event, even SystemExit
        traceback.print_exc(file=sys.stderr)
        events.emit("error", **describe_failure(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
