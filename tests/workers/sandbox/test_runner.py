"""The real runner (`python -m workers.sandbox.runner`) with the real engine, and a real worker
process
auditing a tiny TorchScript model end to end."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen

import pytest
import redis
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Audit, Model
from service.queue.broker import QUEUE_ADMISSION, QUEUE_CPU, make_celery
from service.settings import Settings
from service.storage.stores import BlobStore
from tests.fixtures.model_factory import tiny_cnn_spec, tiny_cnn_torchscript
from tests.workers.conftest import (
    PROJECT_ROOT,
    REQUEST,
    add_audit,
    add_model,
    celery_worker_argv,
    wait_for,
    worker_env,
)
from workers.engine.liveness import run_model
from workers.execution import job_dirs
from workers.execution.steps import sandbox_for
from workers.sandbox.child import RunnerChild
from workers.sandbox.runner import describe_failure
from workers.shared.errors import EngineInputError, ModelFailed

StartProcess = Callable[[list[str], dict[str, str]], Popen[bytes]]


def test_an_exception_becomes_an_error_event_not_a_bare_traceback(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text('{"kind": "audit"}')  # not a valid RunnerRequest
    done = subprocess.run(
        [sys.executable, "-m", "workers.sandbox.runner", str(tmp_path)],
        capture_output=True,
        cwd=PROJECT_ROOT,
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stdout.decode().strip().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "error" and event["info"] == {"status": 422, "cause": "input"}
    assert "model_file" in event["reason"]
    assert b"Traceback" in done.stderr  # the details go to the worker's log


@pytest.fixture
def tiny_model(settings: Settings, session: Session, tmp_path: Path) -> Model:
    path = tiny_cnn_torchscript(tmp_path / "tiny.pt")
    blob = path.read_bytes()
    model = add_model(session, settings, status="validating", blob=blob)
    model.spec = tiny_cnn_spec(size=16)
    session.commit()
    assert BlobStore(settings.blob_dir).exists(hashlib.sha256(blob).hexdigest())
    return model


@pytest.mark.needs("bwrap")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_sandboxed_audit_streams_progress_shards_and_a_report(
    settings: Settings, session: Session, tiny_model: Model
) -> None:
    audit = add_audit(session, tiny_model, attempts=1)
    job_dir = job_dirs.materialise_audit_job(session, settings, audit, tiny_model)
    child = RunnerChild(
        sandbox_for(settings, "torchscript"),
        "workers.sandbox.runner",
        job_dir,
        time_limit=300,
        use_gpu=False,
    )
    events = [e for e in child.events(tick_seconds=1.0) if e is not None]
    outcome = child.finish()
    kinds = [e.event for e in events]
    assert outcome.returncode == 0, outcome.stderr_tail
    assert "progress" in kinds and "shard" in kinds and kinds[-1] == "report"
    fractions = [e.fraction for e in events if e.event == "progress"]
    assert fractions == sorted(fractions)
    report = json.loads((job_dir / "out" / "report.json").read_text())
    assert report["verdict"] in ("pass", "fail", "info")
    assert [c["kind"] for c in report["checks"]][0] == "random_noise"


@pytest.mark.needs("redis", "bwrap")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_runs_a_real_random_noise_audit(
    settings: Settings,
    session: Session,
    tiny_model: Model,
    redis_client: redis.Redis,
    start_process: StartProcess,
) -> None:
    start_process(celery_worker_argv("real"), worker_env(settings, "workers.sandbox.runner"))
    celery = make_celery(settings)
    celery.send_task("tightrope.admit_model", args=[tiny_model.id], queue=QUEUE_ADMISSION)

    def model_status() -> str:
        session.commit()
        return str(session.scalar(select(Model.status).where(Model.id == tiny_model.id)))

    wait_for(lambda: model_status() != "validating", timeout=120)
    assert model_status() == "ready"
    audit = add_audit(session, tiny_model, request=REQUEST)
    celery.send_task("tightrope.run_audit", args=[audit.id], queue=QUEUE_CPU)

    def finished() -> Audit | None:
        session.commit()
        row = session.get(Audit, audit.id, populate_existing=True)
        return row if row is not None and row.status in ("succeeded", "failed") else None

    row = wait_for(finished, timeout=180)
    assert row.status == "succeeded", row.error
    report = json.loads((settings.artifact_dir / row.report_path).read_text())
    assert report["verdict"] == row.verdict
    assert report["checks"][0]["kind"] == "random_noise"


def test_the_celery_side_never_imports_torch() -> None:
    code = (
        "import sys, workers.execution.celery_app, workers.execution.tasks, "
        "workers.execution.supervisor; "
        "sys.exit('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, timeout=120)
    assert done.returncode == 0


@pytest.mark.parametrize(
    ("exc", "status", "cause"),
    [
        (EngineInputError("operator and dataset disagree"), 422, "input"),
        (ModelFailed("the model raised RuntimeError: boom"), 422, "input"),
        (FileNotFoundError("inputs/dataset.npy"), 422, "input"),
        (ValueError("one seed per image"), 500, "internal"),  # an engine bug, not the user's
        (KeyError("levels"), 500, "internal"),
        (RuntimeError("[enforce fail] can't allocate memory: 1 GiB"), 422, "memory"),
        (MemoryError(), 422, "memory"),
        (OSError(errno.ENOSPC, "No space left on device"), 500, "storage"),
    ],
)
def test_failures_are_told_apart(exc: BaseException, status: int, cause: str) -> None:
    info = describe_failure(exc)["info"]
    assert (info["status"], info["cause"]) == (status, cause)


def test_a_model_that_raises_is_the_models_fault() -> None:
    class Raises(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("shape mismatch inside the model")

    with pytest.raises(ModelFailed, match="the model raised RuntimeError: shape mismatch"):
        run_model(Raises(), torch.zeros(1))
