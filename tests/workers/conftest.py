"""Fixtures of the worker tests: real SQLite and PostgreSQL databases, real Redis (its own
database number), a data directory per test, and helpers to create rows and start workers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import make_engine
from service.db.tables import Audit, Base, Model, Tenant, utcnow
from service.settings import Settings
from service.storage.stores import BlobStore
from tests.fixtures.redis_dbs import redis_url
from workers.execution.supervisor import worker_command

REDIS_URL = redis_url(12)  # the worker tests' own database on the shared Redis
PROJECT_ROOT = Path(__file__).resolve().parents[2]

SPEC = {
    "name": "tiny",
    "task": "reconstruction",
    "input": "adjoint",
    "image_shape": [1, 16, 16],
    "complex": False,
    "value_range": [0.0, 1.0],
}
REQUEST = {
    "model_id": "filled-in",
    "dataset": {"builtin": "shepp_logan", "count": 2, "size": 16, "seed": 0},
    "operator": {"kind": "mri", "mask": "cartesian", "acceleration": 4.0},
    "noise_level": 0.0,
    "checks": [{"kind": "random_noise", "levels": [0.01], "samples": 2}],
    "seed": 0,
    "device": "cpu",
}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'tightrope.db'}"


def fast_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "broker_url": REDIS_URL,
        "lease_seconds": 3.0,
        "heartbeat_seconds": 0.3,
        "reconcile_interval_seconds": 1.0,
        "requeue_after_seconds": 2.0,
        "max_attempts": 3,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    (tmp_path / "data").mkdir(exist_ok=True)
    return fast_settings(tmp_path, database_url)


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.resolved_database_url)
    Base.metadata.create_all(engine)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as s:
        yield s


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def add_model(
    session: Session,
    settings: Settings,
    *,
    status: str = "ready",
    blob: bytes = b"not a model",
    spec: dict[str, Any] | None = None,
) -> Model:
    tenant = Tenant(name=f"tenant-{uuid.uuid4().hex[:8]}")
    session.add(tenant)
    session.flush()
    BlobStore(settings.blob_dir).put_bytes(blob)
    model = Model(
        tenant_id=tenant.id,
        name="tiny",
        spec=spec or SPEC,
        format="torchscript",
        sha256=hashlib.sha256(blob).hexdigest(),
        size_bytes=len(blob),
        status=status,
    )
    session.add(model)
    session.commit()
    return model


def add_audit(
    session: Session,
    model: Model,
    *,
    enqueued_at: datetime | None = None,
    request: dict[str, Any] | None = None,
    **values: Any,
) -> Audit:
    body = dict(request or REQUEST, model_id=model.id)
    audit = Audit(
        tenant_id=model.tenant_id,
        model_id=model.id,
        request=body,
        request_hash=hashlib.sha256(repr(body).encode()).hexdigest(),
        enqueued_at=enqueued_at or utcnow(),
        **values,
    )
    session.add(audit)
    session.commit()
    return audit


def worker_env(settings: Settings, runner_module: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIGHTROPE_")}
    env.update(
        {
            "TIGHTROPE_DATA_DIR": str(settings.data_dir),
            "TIGHTROPE_DATABASE_URL": settings.resolved_database_url,
            "TIGHTROPE_BROKER_URL": settings.broker_url,
            "TIGHTROPE_RUNNER_MODULE": runner_module,
            "TIGHTROPE_LEASE_SECONDS": str(settings.lease_seconds),
            "TIGHTROPE_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
            "TIGHTROPE_RECONCILE_INTERVAL_SECONDS": str(settings.reconcile_interval_seconds),
            "TIGHTROPE_REQUEUE_AFTER_SECONDS": str(settings.requeue_after_seconds),
            "TIGHTROPE_MAX_ATTEMPTS": str(settings.max_attempts),
            "PYTHONPATH": str(PROJECT_ROOT),
        }
    )
    return env


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start a process in its own group; every one is killed at the end of the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"process-{len(started)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def celery_worker_argv(name: str) -> list[str]:
    """The supervisor's own Celery command line, named for the test."""
    return worker_command(
        ["--hostname", f"{name}@test", "--loglevel", "info", "--without-mingle", "--without-gossip"]
    )
