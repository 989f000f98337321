"""End-to-end fixtures: the real gateway (uvicorn), real supervised Celery workers, the real
Redis broker, SQLite and PostgreSQL, and the sandboxed runner."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from sqlalchemy import create_engine, select

from service.db.tables import AuditShard
from tests.fixtures.redis_dbs import redis_db
from workers.cli.client import TightropeClient
from workers.cli.stack import LocalStack

REDIS_DB = redis_db(13)  # the integration tests' own database on the shared Redis
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"

# Short leases and reconciliation so that fault recovery happens within seconds.
# uvicorn's access log: `INFO:     127.0.0.1:33484 - "GET /v1/audits/… HTTP/1.1" 200 OK`
_ACCESS_LINE = re.compile(r'^INFO: +[0-9a-f.:\[\]]+:\d+ - "')

FAST_RECOVERY = {
    "TIGHTROPE_LEASE_SECONDS": "4",
    "TIGHTROPE_HEARTBEAT_SECONDS": "0.5",
    "TIGHTROPE_RECONCILE_INTERVAL_SECONDS": "1",
    "TIGHTROPE_REQUEUE_AFTER_SECONDS": "3",
    "TIGHTROPE_WORKER_STALE_SECONDS": "10",
}


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def make_stack(
    tmp_path: Path, redis_client: redis.Redis, request: pytest.FixtureRequest
) -> Iterator:
    if "database_url" in request.fixturenames:
        # Set up first, so torn down last: the stacks stop before their database is dropped
        # (else a failed test's logs end in the workers' "database does not exist").
        request.getfixturevalue("database_url")
    stacks: list[LocalStack] = []

    def make(
        database_url: str,
        workers: int = 1,
        broker: str = REDIS_URL,
        private_dirs: bool = False,
        **env: str,
    ) -> LocalStack:
        stack = LocalStack(
            data_dir=tmp_path / f"data{len(stacks)}",
            broker_url=broker,
            database_url=database_url,
            workers=workers,
            extra_env={**FAST_RECOVERY, **env},
            private_dirs=private_dirs,
        )
        stacks.append(stack)
        if workers:
            stack.start()
        else:
            stack.start_without_ready()
        return stack

    yield make
    for stack in stacks:
        logs = stack.log_dir
        stack.stop()
        for log in sorted(logs.glob("*.log")) if logs.exists() else []:
            # shown by pytest only when the test failed; without the access log's lines (polls),
            # which would push what the workers said out of a CI excerpt
            lines = log.read_text(errors="replace").splitlines()
            said = "\n".join(line for line in lines if not _ACCESS_LINE.search(line))
            print(f"===== {log.name} =====\n{said[-6000:]}")


def create_key(stack: LocalStack, tenant: str = "acme") -> str:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "keys", "create", "--tenant", tenant],
        env=stack.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def client_for(stack: LocalStack, tenant: str = "acme") -> TightropeClient:
    return TightropeClient(stack.api_url, create_key(stack, tenant))


class ResidualCNN(torch.nn.Module):
    """A small post-processing network: x + conv(relu(conv(x))), input the adjoint A*y."""

    def __init__(self, channels: int = 2, gain: float = 0.3) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, channels, 3, padding=1)
        with torch.no_grad():
            self.conv2.weight.mul_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


SIZE = 16
MODEL_SPEC = {
    "name": "residual-cnn",
    "task": "reconstruction",
    "input": "adjoint",
    "image_shape": [2, SIZE, SIZE],
    "complex": True,
    "value_range": [0.0, 1.0],
}


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "residual_cnn.pt"
    torch.jit.save(torch.jit.script(ResidualCNN().eval()), str(path))
    return path


def audit_request(model_id: str, **overrides: object) -> dict:
    request: dict = {
        "model_id": model_id,
        "dataset": {"builtin": "ellipses", "count": 3, "size": SIZE, "seed": 1},
        "operator": {"kind": "mri", "acceleration": 4, "center_fraction": 0.1, "seed": 0},
        "checks": [
            {"kind": "random_noise", "levels": [0.01, 0.05], "samples": 4, "failure_error": 0.5},
        ],
        "seed": 7,
        "device": "cpu",
    }
    request.update(overrides)
    return request


def upload_ready_model(client: TightropeClient, model_file: Path) -> str:
    uploaded = client.upload_model(model_file, MODEL_SPEC)
    model = client.wait_model(uploaded["id"], timeout=120)
    assert model["status"] == "ready", model
    return str(model["id"])


def canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# --- helpers of the scale-out and fault tests ----------------------------------------------


def shard_rows(stack: LocalStack, audit_id: str) -> list[dict]:
    """The audit's shard rows, read straight from the stack's database, in plan order."""
    assert stack.database_url is not None
    engine = create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(AuditShard.__table__)
                .where(AuditShard.audit_id == audit_id)
                .order_by(AuditShard.position)
            ).mappings()
            return [dict(row) for row in rows]
    finally:
        engine.dispose()


def wait_until(condition, timeout: float, what: str, poll: float = 0.2):
    """Call `condition` until it returns something truthy (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(poll)
