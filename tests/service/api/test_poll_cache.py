"""The poll cache (service/api/poll_cache.py): without the announcements of audit changes a
worker's change is seen within poll_cache_seconds, this gateway's own change (a cancel) at
once, another tenant never; with them, an announced change at once and nothing else expires
the answer before poll_cache_subscribed_seconds (the real gateway over HTTP:
test_poll_feed.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.api import audit_routes as audits_api
from service.api.app import create_app
from service.api.poll_cache import PollCache
from service.db.audit_changes import announced
from service.db.session import make_engine
from service.db.tables import Audit
from tests.service.api.test_audit_routes import audit_request, set_audit, submit
from tests.service.conftest import ModelFiles, assert_problem, make_settings, new_key, ready_model

# long enough that a few requests and a database write fit inside it on a loaded 2-core machine
TTL = 1.5


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_are_forgotten_and_bounded() -> None:
    clock = FakeClock()
    cache = PollCache(2.0, max_entries=2, clock=clock)
    cache.put("t", "a", '"1"', b"one")
    assert cache.get("t", "a") is not None and cache.get("other-tenant", "a") is None
    clock.now += 4.0
    assert cache.get("t", "a") is None  # expired, grace included
    cache.put("t", "a", '"1"', b"one")
    cache.forget("a")
    assert cache.get("t", "a") is None
    for audit in ("a", "b", "c"):
        cache.put("t", audit, '"x"', b"x")
    assert cache.get("t", "a") is None and cache.get("t", "c") is not None  # oldest evicted
    # a 304's tag-only answer keeps the body already known for that tag
    cache.put("t", "c", '"x"', None)
    entry = cache.get("t", "c")
    assert entry is not None and entry.body == b"x"
    assert PollCache(0).put("t", "a", '"1"', b"one") is not None  # 0: answers, keeps nothing
    assert PollCache(0).get("t", "a") is None


@pytest.fixture
def cached_client(tmp_path: Path, database_url: str, broker: redis.Redis) -> Iterator[TestClient]:
    """A gateway that does not subscribe to audit changes: the short TTL alone."""
    settings = make_settings(
        tmp_path, database_url, poll_cache_seconds=TTL, poll_cache_subscribed_seconds=0
    )
    with TestClient(create_app(settings)) as client:
        yield client


def wait_subscribed(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while not client.app.state.audit_feed.subscribed:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the gateway never subscribed to audit changes"
        time.sleep(0.02)


def test_subscribed_an_announced_change_is_seen_at_once_an_unannounced_one_is_kept(
    tmp_path: Path,
    database_url: str,
    broker: redis.Redis,
    model_files: ModelFiles,
) -> None:
    settings = make_settings(
        tmp_path,
        database_url,
        poll_cache_seconds=TTL,
        poll_cache_subscribed_seconds=60,
        audit_changes_channel=f"test-changes-{uuid.uuid4().hex}",
    )
    with TestClient(create_app(settings)) as client:
        wait_subscribed(client)
        auth = new_key(client)
        model_id = ready_model(client, auth, model_files.torchscript)
        audit_id = submit(client, auth, audit_request(model_id)).json()["id"]
        url = f"/v1/audits/{audit_id}"

        def poll() -> str:
            status: str = client.get(url, headers=auth).json()["status"]
            return status

        def listed() -> str:
            status: str = client.get("/v1/audits", headers=auth).json()["items"][0]["status"]
            return status

        assert poll() == "queued" and listed() == "queued"
        # A change nobody announced (written past the announcing sessions): kept well beyond
        # poll_cache_seconds, which no longer expires anything.
        engine = make_engine(settings.resolved_database_url)
        with engine.begin() as conn:
            conn.execute(update(Audit).where(Audit.id == audit_id).values(status="running"))
        engine.dispose()
        time.sleep(3 * TTL)
        assert poll() == "queued" and listed() == "queued"
        # An announced change (as a worker writes it): at once, the list with it.
        set_audit(client, audit_id, progress_fraction=0.5)
        deadline = time.monotonic() + 1.0
        while poll() != "running" or listed() != "running":
            assert time.monotonic() < deadline, "the announced change was not seen within 1 s"
            time.sleep(0.01)


def test_a_workers_change_is_seen_within_the_cache_time_a_cancel_at_once(
    cached_client: TestClient, model_files: ModelFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = cached_client
    reads: list[str] = []
    answer_poll = audits_api._answer_poll

    def counted(*args: Any) -> Any:
        reads.append(args[2])
        return answer_poll(*args)

    monkeypatch.setattr(audits_api, "_answer_poll", counted)
    auth = new_key(client)
    model_id = ready_model(client, auth, model_files.torchscript)
    audit_id = submit(client, auth, audit_request(model_id)).json()["id"]
    url = f"/v1/audits/{audit_id}"
    first = client.get(url, headers=auth)
    assert first.status_code == 200 and first.json()["status"] == "queued"

    set_audit(client, audit_id, status="running", progress_fraction=0.5)  # as a worker does
    cached = client.get(url, headers=auth)
    assert cached.json()["status"] == "queued" and cached.headers["etag"] == first.headers["etag"]
    # ... answered before routing (no database read), with the route's very bytes and headers
    assert reads == [audit_id] and cached.content == first.content
    assert cached.headers == first.headers
    unchanged = client.get(url, headers={**auth, "If-None-Match": first.headers["etag"]})
    assert unchanged.status_code == 304
    time.sleep(TTL + 0.1)
    fresh = client.get(url, headers=auth)
    assert fresh.json()["status"] == "running" and fresh.headers["etag"] != first.headers["etag"]

    other = new_key(client)
    assert_problem(client.get(url, headers=other), 404)  # the cache is per tenant

    set_audit(client, audit_id, status="queued")  # handed back; the cache still says running
    assert client.post(f"{url}/cancel", headers=auth).status_code == 202
    after = client.get(url, headers=auth).json()
    assert after["status"] == "cancelled"  # this gateway's own write: no stale answer


def test_the_audit_list_is_kept_too_and_this_gateways_own_writes_are_seen_at_once(
    cached_client: TestClient, model_files: ModelFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = cached_client
    queries: list[str | None] = []
    list_page = audits_api.list_page

    def counted(*args: Any) -> Any:
        queries.append(args[2])  # the status filter
        return list_page(*args)

    monkeypatch.setattr(audits_api, "list_page", counted)
    auth = new_key(client)
    model_id = ready_model(client, auth, model_files.torchscript)
    first_id = submit(client, auth, audit_request(model_id)).json()["id"]

    def statuses(query: str = "") -> dict[str, str]:
        page = client.get(f"/v1/audits{query}", headers=auth)
        assert page.status_code == 200, page.text
        return {item["id"]: item["status"] for item in page.json()["items"]}

    assert statuses() == {first_id: "queued"} and len(queries) == 1
    assert statuses() == {first_id: "queued"} and len(queries) == 1  # answered before routing
    assert statuses("?status=queued") == {first_id: "queued"} and queries[-1] == "queued"
    set_audit(client, audit_id=first_id, status="running")  # as a worker does
    assert statuses() == {first_id: "queued"}  # kept ...
    time.sleep(TTL + 0.1)
    assert statuses() == {first_id: "running"}  # ... for at most the cache time

    second_id = submit(client, auth, audit_request(model_id, seed=7)).json()["id"]
    assert statuses() == {first_id: "running", second_id: "queued"}  # this gateway's write
    assert client.post(f"/v1/audits/{second_id}/cancel", headers=auth).status_code == 202
    assert statuses()[second_id] == "cancelled"
    assert statuses("?status=queued") == {}
    other = new_key(client)
    assert client.get("/v1/audits", headers=other).json()["items"] == []  # per tenant

    # A made-up parameter is answered (FastAPI ignores it) but never kept: each is a query.
    before = len(queries)
    for nonce in range(3):
        assert client.get(f"/v1/audits?nonce={nonce}", headers=auth).status_code == 200
    assert len(queries) == before + 3
    assert client.app.state.audit_list_cache.bytes_held < 64 * 1024  # type: ignore[attr-defined]


def test_without_a_redis_broker_nothing_is_announced_and_the_short_ttl_holds(
    tmp_path: Path, database_url: str
) -> None:
    """`filesystem://` (one host without Redis): no announcements, no subscription; the app
    starts and answers, and keeps polls for poll_cache_seconds only."""
    settings = make_settings(
        tmp_path, database_url, broker_url="filesystem://", poll_cache_seconds=TTL
    )
    assert not announced(settings)
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
            assert not session.dispatch.after_commit  # no announcing hooks
        time.sleep(0.2)
        assert not client.app.state.audit_feed.subscribed  # type: ignore[attr-defined]
        assert client.app.state.poll_cache.cache.long_ttl_seconds is None  # type: ignore[attr-defined]
