"""Many clients polling (issue 11): the gateway queues them instead of exhausting its database
pool; an overloaded request is a 503 `busy` with Retry-After, never a 500 or a 30 s hang; API
keys are cached briefly; a poll is cheap."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from benchmarks.poll_load import seed_rows as seed
from service.api.app import create_app
from service.db.keys import hash_key
from service.db.migrate import upgrade_to_head
from service.db.session import make_engine
from service.db.tables import ApiKey, utcnow
from tests.service.api.test_uvicorn_smoke import free_port, wait_until_serving
from tests.service.conftest import REDIS_URL, assert_problem, make_settings, sessions_of

# timing bounds of a second or two: run alone, not beside other tests (Makefile)
pytestmark = pytest.mark.serial

CLIENTS = 64
LOAD_SECONDS = 3.0


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'tightrope.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def serve(tmp_path: Path, url: str, **settings: str) -> Iterator[str]:
    env = {
        **os.environ,
        "TIGHTROPE_DATA_DIR": str(tmp_path / "data"),
        "TIGHTROPE_DATABASE_URL": url,
        "TIGHTROPE_BROKER_URL": REDIS_URL,
        **{f"TIGHTROPE_{name.upper()}": value for name, value in settings.items()},
    }
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app"]
    server = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, server)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.needs("redis")  # a real gateway process
def test_many_pollers_queue_instead_of_failing(tmp_path: Path, db_url: str) -> None:
    """The finding: 64 connections polling with a small pool. Before the fix every request
    waited 30 s for a connection and ended in a 500 (QueuePool limit ... reached)."""
    upgrade_to_head(db_url)
    engine = make_engine(db_url)
    with Session(engine) as session:
        secret, audit_id = seed(session, f"pollers-{uuid.uuid4().hex[:8]}")
    engine.dispose()
    # A deliberately small pool, no overflow, no key cache: every request queries.
    server = serve(
        tmp_path,
        db_url,
        db_pool_size="2",
        db_max_overflow="0",
        db_pool_timeout_seconds="2",
        db_queue_timeout_seconds="10",
        api_key_cache_seconds="0",
    )
    base = next(server)
    try:
        headers = {"Authorization": f"Bearer {secret}"}
        etag = httpx.get(f"{base}/v1/audits/{audit_id}", headers=headers).headers["etag"]
        statuses: Counter[int] = Counter()
        failures: list[str] = []
        lock = threading.Lock()
        stop = time.monotonic() + LOAD_SECONDS

        def poll(worker: int) -> None:
            paths = [
                ("/v1/audits", {}),
                (f"/v1/audits/{audit_id}", {}),
                (f"/v1/audits/{audit_id}", {"If-None-Match": etag}),
            ]
            with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
                i = worker
                while time.monotonic() < stop:
                    path, extra = paths[i % len(paths)]
                    i += 1
                    try:
                        response = http.get(path, headers=extra)
                    except httpx.HTTPError as exc:
                        with lock:
                            failures.append(f"{path}: {exc!r}")
                        return
                    with lock:
                        statuses[response.status_code] += 1
                    if response.status_code == 503:
                        ok = (
                            "retry-after" in response.headers
                            and response.headers["content-type"] == "application/problem+json"
                            and response.json()["type"].endswith("/busy")
                        )
                        if not ok:
                            with lock:
                                failures.append(f"{path}: 503 {response.headers} {response.text}")
                    elif response.status_code not in (200, 304):
                        with lock:
                            failures.append(f"{path}: {response.status_code} {response.text}")

        threads = [threading.Thread(target=poll, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert not any(thread.is_alive() for thread in threads)
        assert failures == [], (failures[:5], statuses)
        assert statuses[500] == 0 and statuses[200] + statuses[304] > CLIENTS, statuses
        # The load queued rather than timed out: a request waits for a slot (milliseconds
        # here), never for a pooled connection (where 64 threads deadlocked: see
        # service/api/db_slots.py).
        assert statuses[503] == 0, statuses
        # Right after the load the service answers at once.
        started = time.monotonic()
        after = httpx.get(f"{base}/v1/audits", headers=headers, timeout=5)
        assert after.status_code == 200 and after.json()["items"][0]["id"] == audit_id
        assert time.monotonic() - started < 2
    finally:
        server.close()


def test_a_request_without_a_slot_in_time_is_busy(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, db_pool_size=1, db_queue_timeout_seconds=0.1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        with sessions_of(client)() as session:
            secret, audit_id = seed(session, f"busy-{uuid.uuid4().hex[:8]}")
        headers = {"Authorization": f"Bearer {secret}"}
        db_slots: Any = client.app.state.db_slots  # type: ignore[attr-defined]
        assert client.portal is not None
        client.portal.call(db_slots._semaphore.acquire)  # another request holds the only slot
        try:
            busy = client.get(f"/v1/audits/{audit_id}", headers=headers)
            assert_problem(busy, 503, "busy")
            assert busy.headers["retry-after"] == "1"
            assert_problem(client.get("/v1/audits", headers=headers), 503, "busy")
        finally:
            client.portal.call(db_slots._semaphore.release)
        assert client.get(f"/v1/audits/{audit_id}", headers=headers).status_code == 200
        assert db_slots.in_use == 0  # every request gave its slot back


def test_no_pooled_connection_in_time_is_busy_not_500(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(
        tmp_path, database_url, db_pool_size=1, db_max_overflow=0, db_pool_timeout_seconds=0.1
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        with sessions_of(client)() as session:
            secret, _ = seed(session, f"pool-{uuid.uuid4().hex[:8]}")
        headers = {"Authorization": f"Bearer {secret}"}
        engine: Any = client.app.state.engine  # type: ignore[attr-defined]
        with engine.connect():  # something outside the requests holds the only connection
            busy = client.get("/v1/audits", headers=headers)
        assert_problem(busy, 503, "busy")
        assert "retry-after" in busy.headers
        # The failed request returned nothing it did not have; the pool is whole again.
        assert client.get("/v1/audits", headers=headers).status_code == 200
        assert engine.pool.checkedout() == 0


def count_queries(client: TestClient) -> list[str]:
    statements: list[str] = []
    engine: Any = client.app.state.engine  # type: ignore[attr-defined]

    @event.listens_for(engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    return statements


def test_a_repeated_poll_is_one_query_and_revocation_reaches_it(
    tmp_path: Path, database_url: str
) -> None:
    settings = make_settings(tmp_path, database_url, api_key_cache_seconds=0.5)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        with sessions_of(client)() as session:
            secret, audit_id = seed(session, f"cache-{uuid.uuid4().hex[:8]}")
        headers = {"Authorization": f"Bearer {secret}"}
        first = client.get(f"/v1/audits/{audit_id}", headers=headers)
        assert first.status_code == 200
        statements = count_queries(client)
        again = client.get(
            f"/v1/audits/{audit_id}", headers={**headers, "If-None-Match": first.headers["etag"]}
        )
        assert again.status_code == 304 and again.headers["etag"] == first.headers["etag"]
        audit_queries = [s for s in statements if "audits" in s]
        assert len(statements) == 1 and len(audit_queries) == 1, statements  # no key lookup
        assert "request_hash" not in statements[0]  # only the view's columns are loaded
        listed = client.get("/v1/audits", headers=headers)
        assert listed.status_code == 200 and len(statements) == 2, statements  # no N+1

        # Revoked by another process (no revoke_api_key here): refused within the cache time.
        with sessions_of(client)() as session:
            session.execute(
                update(ApiKey)
                .where(ApiKey.key_hash == hash_key(secret))
                .values(revoked_at=utcnow())
            )
            session.commit()
        time.sleep(0.6)
        assert_problem(client.get(f"/v1/audits/{audit_id}", headers=headers), 401)
