"""Fixtures of the gateway tests: the app over real SQLite and PostgreSQL databases, the real
Redis broker (its own database number), API keys, and tiny model and dataset files."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from safetensors.numpy import save_file
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.db.keys import create_api_key
from service.db.tables import Model
from service.queue.broker import ALL_QUEUES, broker_keys
from service.settings import Settings
from tests.fixtures import model_factory
from tests.fixtures.databases import postgres_database
from tests.fixtures.redis_dbs import redis_url

torch.set_num_threads(1)

REDIS_URL = redis_url(15)  # the gateway tests' own database on the shared Redis
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1
MAX_UPLOAD = 256 * 1024
SPEC = model_factory.tiny_cnn_spec()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test session, dropped at the end."""
    with postgres_database("svc") as url:
        yield url


@pytest.fixture(scope="session")
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'tightrope.db'}"
    # One PostgreSQL database per session; tests stay apart through their own tenants.
    url: str = request.getfixturevalue("postgres_url")
    return url


def broker_messages(client: redis.Redis, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """(Redis list, message) of every message waiting in `queue`, across its priority steps:
    the lists in the order a worker serves them, each list's oldest message first."""
    found = []
    for key in broker_keys(queue):
        for raw in reversed(client.lrange(key, 0, -1)):  # LPUSHed: the newest is at 0
            found.append((key, json.loads(raw)))
    return found


def broker_count(client: redis.Redis, *queues: str) -> int:
    """How many messages wait in these queues (all of them if none is named)."""
    return sum(client.llen(key) for queue in queues or ALL_QUEUES for key in broker_keys(queue))


def clear_queues(client: redis.Redis, *queues: str) -> None:
    client.delete(*(key for queue in queues or ALL_QUEUES for key in broker_keys(queue)))


def make_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "broker_url": REDIS_URL,
        "max_upload_bytes": MAX_UPLOAD,
        "max_archive_entries": 64,
        "max_archive_uncompressed_bytes": 16 * 1024**2,
        "max_compression_ratio": 200.0,
        "worker_stale_seconds": 30.0,
        # Tests change audit rows directly (as workers do) and read them back at once; the poll
        # cache has its own tests (test_poll_cache.py).
        "poll_cache_seconds": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, broker: redis.Redis) -> Settings:
    return make_settings(tmp_path, database_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def sessions_of(client: TestClient) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = client.app.state.sessionmaker  # type: ignore[attr-defined]
    return factory


def new_key(client: TestClient) -> dict[str, str]:
    """Authorization headers of a fresh tenant."""
    with sessions_of(client)() as session:
        secret = create_api_key(session, f"tenant-{uuid.uuid4().hex[:10]}")
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def auth(client: TestClient) -> dict[str, str]:
    return new_key(client)


@dataclass(frozen=True)
class ModelFiles:
    torchscript: Path
    export: Path
    safetensors: Path


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    root = tmp_path_factory.mktemp("models")
    weights = root / "weights.safetensors"
    rng = np.random.default_rng(0)
    save_file({"conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32)}, str(weights))
    return ModelFiles(
        torchscript=model_factory.tiny_cnn_torchscript(root / "tiny.pt"),
        export=model_factory.tiny_cnn_export(root / "tiny.pt2"),
        safetensors=weights,
    )


def upload_model(
    client: TestClient,
    auth: dict[str, str],
    path: Path,
    spec: dict[str, Any] | str | None = None,
) -> Any:
    spec_text = spec if isinstance(spec, str) else json.dumps(spec if spec is not None else SPEC)
    return client.post(
        "/v1/models",
        headers=auth,
        files={"file": (path.name, path.read_bytes(), "application/octet-stream")},
        data={"spec": spec_text},
    )


def ready_model(client: TestClient, auth: dict[str, str], path: Path) -> str:
    """Upload a model and mark it ready, as the admission worker would."""
    response = upload_model(client, auth, path)
    assert response.status_code == 202, response.text
    model_id: str = response.json()["id"]
    set_model_status(client, model_id, "ready")
    return model_id


def set_model_status(
    client: TestClient, model_id: str, status: str, reason: str | None = None
) -> None:
    with sessions_of(client)() as session:
        model = session.get(Model, model_id)
        assert model is not None
        model.status = status
        model.reason = reason
        session.commit()


def assert_problem(response: Any, status: int, slug: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"] and body["detail"]
    if slug is not None:
        assert body["type"].endswith("/" + slug), body
    return body
