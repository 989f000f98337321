"""What a runner costs a worker, through real Celery workers, real Redis and the real sandbox:
a model that hangs mid-audit is stopped by the watchdog (the real runner and a hostile
TorchScript model), and each runner ends with its audit, whatever the outcome, so a worker
never holds two (a fake runner whose shards succeed, fail or never return)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen

import pytest
import redis
from sqlalchemy.orm import Session

from service.db.tables import Audit
from service.queue.broker import QUEUE_CPU, make_celery
from service.settings import Settings
from tests.fixtures.hostile_models import hangs_unless_pairs_torchscript
from tests.workers.conftest import (
    REQUEST,
    add_audit,
    add_model,
    celery_worker_argv,
    wait_for,
    worker_env,
)
from workers.execution.admission_job import execute_admission

pytestmark = [
    pytest.mark.needs("redis", "bwrap"),
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

StartProcess = Callable[[list[str], dict[str, str]], Popen[bytes]]
TERMINAL = ("succeeded", "failed", "cancelled")


def runner_pids(root: int, module: str) -> list[int]:
    """The runner processes (`python -m <module> …`, not their bwrap) descending from `root`,
    read from /proc; zombies have no command line and do not count, nor do warm spares."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if module.encode() in argv and not argv[0].endswith(b"bwrap") and _has_job(argv):
                found.append(pid)
    return found


def _has_job(argv: list[bytes]) -> bool:
    """Not a warm spare still waiting for its job (workers.execution.warm_runner): its job
    directory is empty until the worker moves a job in, and a spare runs no model."""
    if b"--warm" not in argv:
        return True
    job_dir = Path(argv[argv.index(b"--warm") - 1].decode())
    return (job_dir / "job.json").exists()


class RunnerCount:
    """Samples the worker's runners every 50 ms in a thread; `most` is the highest count."""

    def __init__(self, worker: int, module: str) -> None:
        self.worker, self.module = worker, module
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        return len(runner_pids(self.worker, self.module))

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.most = max(self.most, self.now())

    def __enter__(self) -> RunnerCount:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _finished(session: Session, audit_id: str) -> Callable[[], Audit | None]:
    def check() -> Audit | None:
        session.commit()
        row = session.get(Audit, audit_id, populate_existing=True)
        return row if row is not None and row.status in TERMINAL else None

    return check


@pytest.fixture
def sent(settings: Settings) -> Iterator[Callable[[str], object]]:
    celery = make_celery(settings)
    yield lambda audit_id: celery.send_task("tightrope.run_audit", args=[audit_id], queue=QUEUE_CPU)
    celery.close()


def test_a_model_that_hangs_mid_audit_frees_its_worker_after_the_watchdogs_time(
    settings: Settings,
    session: Session,
    redis_client: redis.Redis,
    start_process: StartProcess,
    sent: Callable[[str], object],
    tmp_path: Path,
) -> None:
    """Issue 21: a TorchScript model that loops for ever on any batch but 2 passes its
    admission and its audit's probe, then hangs in the first shard (3 images). The watchdog
    (its floor lowered to 3 s here; 30 s by default) kills the runner and fails the audit with
    `model-hung`, naming the time it allowed, instead of holding the worker for the audit's
    time limit (600 s at least, by default)."""
    blob = hangs_unless_pairs_torchscript(tmp_path / "pairs.pt").read_bytes()
    model = add_model(session, settings, status="validating", blob=blob)
    assert execute_admission(model.id, settings=settings, session=session) == "ready"

    runner = "workers.sandbox.runner"
    env = worker_env(settings, runner) | {"TIGHTROPE_WATCHDOG_MIN_SECONDS": "3"}
    worker = start_process(celery_worker_argv("watchdog"), env)
    request = dict(REQUEST, dataset={"builtin": "shepp_logan", "count": 3, "size": 16, "seed": 0})
    audit = add_audit(session, model, request=request)
    started = time.monotonic()
    sent(audit.id)

    row = wait_for(_finished(session, audit.id), timeout=120)
    assert time.monotonic() - started < 60  # worker start-up and three runners included
    assert row.status == "failed" and row.error is not None
    assert row.error["type"].endswith("/model-hung") and row.error["status"] == 422
    detail = row.error["detail"]
    assert detail.startswith("shard c00-random_noise") and "no progress for 3 s" in detail
    assert "s per input (the probe's second call) × 3 inputs, at least 3 s" in detail
    assert row.error["extra"] == {"watchdog_seconds": 3.0}
    assert row.shards_done == 0
    wait_for(lambda: not runner_pids(worker.pid, runner), timeout=10)  # the worker is free


def test_each_runner_ends_with_its_audit_whether_it_succeeds_fails_or_times_out(
    settings: Settings,
    session: Session,
    redis_client: redis.Redis,
    start_process: StartProcess,
    sent: Callable[[str], object],
) -> None:
    """Issue 21: the last shard's runner stayed alive after its audit, beside the next audit's
    runner, and was never ended when that audit failed or timed out. One worker now runs a
    successful audit (two shards: the runner kept after the first runs the second), a failing
    one and one that runs out of time: it never holds two runners, and none once each audit
    ended (runner_idle_seconds is raised so that only the audit's end can end them)."""
    module = "tests.workers.fakes.outcomes"  # seed 0 succeeds, 1 fails, 2 never returns
    env = worker_env(settings, module) | {"TIGHTROPE_RUNNER_IDLE_SECONDS": "600"}
    worker = start_process(celery_worker_argv("lifetime"), env)
    model = add_model(session, settings)
    requests = {
        "succeeded": dict(REQUEST, checks=[{"kind": "random_noise"}, {"kind": "lipschitz"}]),
        "failed": dict(REQUEST, seed=1),
        "timed out": dict(REQUEST, seed=2, budget={"wall_seconds": 3}),
    }
    with RunnerCount(worker.pid, module) as runners:
        for outcome, request in requests.items():
            audit = add_audit(session, model, request=request)
            sent(audit.id)
            row = wait_for(_finished(session, audit.id), timeout=60)
            assert row.error is None if outcome == "succeeded" else row.error is not None
            assert row.status == ("succeeded" if outcome == "succeeded" else "failed"), row.error
            if outcome == "failed":
                assert "fails on purpose" in row.error["detail"]
            if outcome == "timed out":
                assert row.error["type"].endswith("/time-limit")
            try:
                wait_for(lambda: runners.now() == 0, timeout=5)
            except AssertionError:
                pytest.fail(f"a runner outlived its audit ({outcome}): {runners.now()} alive")
    assert runners.most == 1
