"""The poll cache (service/api/poll_cache.py): a worker's change is seen within
poll_cache_seconds, this gateway's own change (a cancel) at once, another tenant never."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.api import audits as audits_api
from service.api.app import create_app
from service.api.poll_cache import PollCache
from tests.service.api.test_audits_api import audit_request, set_audit, submit
from tests.service.conftest import ModelFiles, assert_problem, make_settings, new_key, ready_model

TTL = 0.5


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
    clock.now += 2.0
    assert cache.get("t", "a") is None  # expired
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
    settings = make_settings(tmp_path, database_url, poll_cache_seconds=TTL)
    with TestClient(create_app(settings)) as client:
        yield client


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
