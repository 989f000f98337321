"""A deployment whose workers cannot sandbox (bubblewrap not installed): nothing waits without
a reason. The real gateway over HTTP, a real supervised worker (`tightrope worker`) started with
a PATH on which there is no `bwrap`, real Redis and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.fixtures.redis_dbs import redis_url
from tests.integration.conftest import MODEL_SPEC, client_for, wait_until
from workers.cli.stack import LocalStack

pytestmark = [pytest.mark.integration, pytest.mark.needs("redis")]

NO_SANDBOX_REDIS = redis_url(8)  # this file's own database on the shared Redis
WAIT_SECONDS = 8  # TIGHTROPE_SANDBOX_WAIT_SECONDS here (600 by default)


def path_without_bwrap(shadow: Path) -> str:
    """This PATH with every directory that holds a `bwrap` replaced by a directory of links to
    everything else in it: the machine as if the bubblewrap package were not installed."""
    dirs = []
    for i, entry in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not entry or not os.path.exists(os.path.join(entry, "bwrap")):
            dirs.append(entry)
            continue
        copy = shadow / str(i)
        copy.mkdir(parents=True)
        for name in os.listdir(entry):
            if name != "bwrap":
                (copy / name).symlink_to(os.path.join(entry, name))
        dirs.append(str(copy))
    path = os.pathsep.join(dirs)
    assert shutil.which("bwrap", path=path) is None
    return path


@pytest.fixture
def no_sandbox_broker() -> Iterator[None]:
    client = redis.Redis.from_url(NO_SANDBOX_REDIS)
    client.flushdb()
    yield
    client.flushdb()
    client.close()


@pytest.fixture
def stack_without_bwrap(
    tmp_path: Path, database_url: str, no_sandbox_broker: None
) -> Iterator[LocalStack]:
    stack = LocalStack(
        data_dir=tmp_path / "data",
        broker_url=NO_SANDBOX_REDIS,
        database_url=database_url,
        workers=0,
        extra_env={
            "PATH": path_without_bwrap(tmp_path / "bin"),
            "TIGHTROPE_SANDBOX_WAIT_SECONDS": str(WAIT_SECONDS),
            "TIGHTROPE_HEARTBEAT_SECONDS": "0.5",
            "TIGHTROPE_RECONCILE_INTERVAL_SECONDS": "1",
            "TIGHTROPE_REQUEUE_AFTER_SECONDS": "1",
            "TIGHTROPE_ADMISSION_TIME_LIMIT": "1",  # a stalled admission is sent again in 2 s
            "TIGHTROPE_WORKER_STALE_SECONDS": "10",
        },
    )
    try:
        stack.start_without_ready()
        # the admission worker only (no CPU worker): admissions are what this is about
        argv = [sys.executable, "-m", "workers.cli.main", "worker", "--name", "nobwrap"]
        stack._spawn("nobwrap", [*argv, "--concurrency", "0", "--without-mingle"])
        yield stack
    finally:
        logs = stack.log_dir
        stack.stop()
        for log in sorted(logs.glob("*.log")) if logs.exists() else []:
            print(f"===== {log.name} =====\n{log.read_text(errors='replace')[-6000:]}")


def _readyz(stack: LocalStack) -> httpx.Response:
    return httpx.get(stack.api_url + "/readyz", timeout=10)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.timeout(240)
def test_without_bubblewrap_readiness_and_the_upload_say_why_and_the_upload_is_refused(
    stack_without_bwrap: LocalStack, model_file: Path
) -> None:
    stack = stack_without_bwrap

    # /readyz: not ready, naming the sandbox (not "ready" while uploads cannot be admitted)
    answer = wait_until(
        lambda: (
            (r := _readyz(stack)).status_code == 503
            and r.json().get("extra", {}).get("down") == ["sandbox"]
            and r
        ),
        90,
        "/readyz reports the worker that cannot sandbox",
    )
    detail = answer.json()["detail"]
    assert "no live worker can sandbox models (unavailable on 1 of 1" in detail
    assert "bubblewrap (bwrap) is not installed" in detail
    assert f"refused {WAIT_SECONDS} s after their upload" in detail

    # the worker said so when it started, in its log
    log = stack.log_dir / "nobwrap.log"
    said = "cannot sandbox models: bubblewrap (bwrap) is not installed"
    line = wait_until(
        lambda: next((x for x in log.read_text(errors="replace").splitlines() if said in x), ""),
        10,
        "the worker's log says it cannot sandbox",
    )
    assert "nobwrap-admission@" in line and "ERROR" in line

    with client_for(stack) as client:
        model_id = client.upload_model(model_file, MODEL_SPEC)["id"]  # a TorchScript .pt
        waiting = wait_until(
            lambda: (m := client.get_model(model_id))["reason"] and m,
            30,
            "the waiting model gets a reason",
        )
        assert waiting["status"] == "validating"
        assert waiting["reason"].startswith("no worker can sandbox models: bubblewrap is missing")
        assert "then is refused" in waiting["reason"]

        refused = wait_until(
            lambda: (m := client.get_model(model_id))["status"] != "validating" and m,
            WAIT_SECONDS + 60,
            "the model is refused after the wait",
        )
    assert refused["status"] == "rejected"
    assert refused["reason"].startswith("no worker can sandbox models")
    assert f"waited {WAIT_SECONDS} s" in refused["reason"]
    assert "TorchScript .pt" in refused["reason"] and "upload the model again" in refused["reason"]
