"""Polls the workers keep fresh (issue 20): real gateway processes over HTTP, real Redis, the
workers' own write functions and a real Celery worker. With the poll cache's times long (60 s),
a change written as a worker writes it is seen within 1 s, because it is announced; a gateway
that is not subscribed (Redis unreachable, its connection lost) falls back to
poll_cache_seconds and clears what it kept, so it never answers from before a change it may
have missed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.poll_load import seed_rows
from service.db import lifecycle
from service.db.audit_changes import announcing_sessionmaker
from service.db.keys import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import make_engine
from service.db.tables import Audit, AuditShard, Tenant, utcnow
from service.queue.dispatch import Dispatcher
from service.settings import Settings
from tests.fixtures.redis_dbs import redis_url
from tests.service.api.test_uvicorn_smoke import free_port, wait_until_serving
from tests.service.conftest import REDIS_URL
from workers.execution import leases, shard_leases

# timing bounds of a second or two: run alone, not beside other tests (Makefile)
pytestmark = pytest.mark.serial

LONG = "60"  # both cache times: only an announcement can make a change show within 1 s
SHORT_TTL = 0.5


@contextmanager
def gateway(tmp_path: Path, url: str, **settings: str) -> Iterator[str]:
    """`uvicorn --factory service.api.app:create_app` on a free port: its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIGHTROPE_")}
    env.update(
        {
            "TIGHTROPE_DATA_DIR": str(tmp_path / "data"),
            "TIGHTROPE_DATABASE_URL": url,
            "TIGHTROPE_BROKER_URL": REDIS_URL,
            **{f"TIGHTROPE_{name.upper()}": value for name, value in settings.items()},
        }
    )
    log = open(tmp_path / f"gateway-{port}.log", "wb")  # noqa: SIM115
    argv = [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app"]
    server = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, server)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def subscribed(base: str) -> bool:
    metrics = httpx.get(f"{base}/metrics", timeout=5).text
    return "tightrope_poll_cache_subscribed 1.0" in metrics


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll `condition` every 10 ms; the seconds it took to hold (fails past `timeout`)."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - started


class Poller:
    def __init__(self, base: str, secret: str, audit_id: str) -> None:
        self.http = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=10
        )
        self.audit_id = audit_id

    def status(self) -> dict[str, Any]:
        response = self.http.get(f"/v1/audits/{self.audit_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def listed(self) -> dict[str, Any]:
        response = self.http.get("/v1/audits")
        assert response.status_code == 200, response.text
        [item] = [i for i in response.json()["items"] if i["id"] == self.audit_id]
        return dict(item)


@pytest.fixture
def channel() -> str:
    return f"test-changes-{uuid.uuid4().hex}"


@pytest.fixture
def seeded(database_url: str, tmp_path: Path) -> tuple[str, str]:
    """A fresh tenant's key and queued audit: (secret, audit id)."""
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    with Session(engine) as session:
        secret, audit_id = seed_rows(session, f"feed-{uuid.uuid4().hex[:8]}")
    engine.dispose()
    return secret, audit_id


@pytest.fixture
def worker_sessions(
    tmp_path: Path, database_url: str, channel: str, broker: redis.Redis
) -> Iterator[sessionmaker[Session]]:
    """Sessions made as a worker makes them (service.db.session.get_sessionmaker)."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url=REDIS_URL,
        audit_changes_channel=channel,
    )
    engine = make_engine(database_url)
    yield announcing_sessionmaker(engine, settings)
    engine.dispose()


def unannounced(database_url: str, audit_id: str, **values: Any) -> None:
    """A change no gateway hears of (as if its message were lost)."""
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(update(Audit).where(Audit.id == audit_id).values(**values))
    engine.dispose()


def test_a_change_written_as_a_worker_writes_it_is_seen_within_a_second(
    tmp_path: Path,
    database_url: str,
    channel: str,
    seeded: tuple[str, str],
    worker_sessions: sessionmaker[Session],
) -> None:
    secret, audit_id = seeded
    settings = {
        "poll_cache_seconds": LONG,
        "poll_cache_subscribed_seconds": LONG,
        "audit_changes_channel": channel,
    }
    with gateway(tmp_path, database_url, **settings) as base:
        wait_until(lambda: subscribed(base), 15, "the gateway subscribes")
        poll = Poller(base, secret, audit_id)
        assert poll.status()["status"] == "queued" and poll.listed()["status"] == "queued"
        owner = leases.new_owner()
        now = utcnow()
        lags: dict[str, float] = {}
        with worker_sessions() as session:
            outcome = lifecycle.acquire_lease(
                session, audit_id, owner, now=now, lease_seconds=60, max_attempts=3
            )
            assert outcome is lifecycle.LeaseOutcome.ACQUIRED
            lags["running"] = wait_until(
                lambda: poll.status()["status"] == "running", 1.0, "running"
            )
            lags["list"] = wait_until(
                lambda: poll.listed()["status"] == "running", 1.0, "running in the list"
            )

            lifecycle.update_owned(
                session, audit_id, owner, **lifecycle.monotone_progress(0.25, check="noise")
            )
            lags["progress"] = wait_until(
                lambda: poll.status()["progress"]["fraction"] == 0.25, 1.0, "progress"
            )

            queue = f"test-queue-{uuid.uuid4().hex[:8]}"
            session.add_all(
                AuditShard(audit_id=audit_id, shard_id=f"s{i}", queue=queue, position=i)
                for i in range(2)
            )
            session.execute(update(Audit).where(Audit.id == audit_id).values(shards_total=2))
            session.commit()
            lags["planned"] = wait_until(
                lambda: poll.status()["shards"] == {"done": 0, "total": 2}, 1.0, "planned"
            )
            claimed = shard_leases.claim_shard(session, queue, owner, now=now, lease_seconds=60)
            assert claimed is not None
            lifecycle.release_shard(
                session, audit_id, claimed.shard_id, owner, status="done", result={}
            )
            lifecycle.count_progress(session, audit_id, now)
            lags["shards"] = wait_until(
                lambda: poll.status()["shards"] == {"done": 1, "total": 2}, 1.0, "a shard done"
            )

            session.execute(update(Audit).where(Audit.id == audit_id).values(attempts=2))
            session.commit()
            lags["attempts"] = wait_until(lambda: poll.status()["attempts"] == 2, 1.0, "attempts")
            session.execute(update(Audit).where(Audit.id == audit_id).values(cancel_requested=True))
            session.commit()
            lags["cancel"] = wait_until(
                lambda: poll.status()["cancel_requested"] is True, 1.0, "cancel requested"
            )

            lifecycle.release_lease(
                session,
                audit_id,
                owner,
                status="succeeded",
                finished_at=now + timedelta(seconds=1),
            )
            lags["succeeded"] = wait_until(
                lambda: poll.status()["status"] == "succeeded", 1.0, "succeeded"
            )
            lags["list_succeeded"] = wait_until(
                lambda: poll.listed()["status"] == "succeeded", 1.0, "succeeded in the list"
            )
        assert max(lags.values()) < 1.0, lags

        # The long time is in force: a change nobody announced is not seen (the answer is
        # kept), which is what makes the timings above the announcements' doing.
        unannounced(database_url, audit_id, progress_message="unheard")
        time.sleep(1.5)
        assert poll.status()["progress"]["message"] != "unheard"


def test_a_cancel_on_one_gateway_is_seen_by_another_within_a_second(
    tmp_path: Path, database_url: str, channel: str, seeded: tuple[str, str]
) -> None:
    secret, audit_id = seeded
    settings = {
        "poll_cache_seconds": LONG,
        "poll_cache_subscribed_seconds": LONG,
        "audit_changes_channel": channel,
    }
    with (
        gateway(tmp_path, database_url, **settings) as first,
        gateway(tmp_path, database_url, **settings) as second,
    ):
        for base in (first, second):
            wait_until(lambda base=base: subscribed(base), 15, "the gateways subscribe")
        elsewhere = Poller(second, secret, audit_id)
        assert elsewhere.status()["status"] == "queued"
        assert elsewhere.listed()["status"] == "queued"
        cancelled = httpx.post(
            f"{first}/v1/audits/{audit_id}/cancel",
            headers={"Authorization": f"Bearer {secret}"},
            timeout=10,
        )
        assert cancelled.status_code == 202, cancelled.text
        lag = wait_until(
            lambda: elsewhere.status()["status"] == "cancelled", 1.0, "the other gateway"
        )
        lag_list = wait_until(lambda: elsewhere.listed()["status"] == "cancelled", 1.0, "its list")
        assert max(lag, lag_list) < 1.0


class TcpProxy:
    """A TCP forwarder to Redis that can be cut (every connection closed, the port refused)
    and restored on the same port: a Redis that goes away and comes back."""

    def __init__(self, target_port: int = 6379) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    forwarder = TcpProxy()
    yield forwarder
    forwarder.stop()


def test_a_lost_subscription_falls_back_to_the_short_ttl_and_recovers(
    tmp_path: Path,
    database_url: str,
    channel: str,
    seeded: tuple[str, str],
    worker_sessions: sessionmaker[Session],
    proxy: TcpProxy,
) -> None:
    secret, audit_id = seeded
    proxy.start()
    settings = {
        "broker_url": f"redis://127.0.0.1:{proxy.port}/15",
        "poll_cache_seconds": str(SHORT_TTL),
        "poll_cache_subscribed_seconds": LONG,
        "audit_changes_channel": channel,
    }

    def announced(**values: Any) -> None:
        with worker_sessions() as session:
            session.execute(update(Audit).where(Audit.id == audit_id).values(**values))
            session.commit()

    with gateway(tmp_path, database_url, **settings) as base:
        wait_until(lambda: subscribed(base), 15, "the gateway subscribes")
        poll = Poller(base, secret, audit_id)
        assert poll.status()["progress"]["message"] is None
        # Subscribed: a change it does not hear of is kept past 2 × poll_cache_seconds.
        unannounced(database_url, audit_id, progress_message="missed")
        time.sleep(3 * SHORT_TTL)
        assert poll.status()["progress"]["message"] is None

        # Redis goes away: the gateway notices, forgets what it kept (it may have missed
        # messages, here the one above), and keeps answers for poll_cache_seconds only.
        proxy.stop()
        wait_until(lambda: not subscribed(base), 5, "the gateway notices the loss")
        assert poll.status()["progress"]["message"] == "missed"
        announced(progress_message="while away")  # sent, but this gateway cannot hear it
        lag = wait_until(
            lambda: poll.status()["progress"]["message"] == "while away",
            2 * SHORT_TTL + 0.5,
            "a change while unsubscribed",
        )
        assert lag <= 2 * SHORT_TTL + 0.5
        assert poll.listed()["progress"]["message"] == "while away"

        # Redis is back: subscribed anew (after its backoff), caches cleared, kept long again.
        proxy.start()
        wait_until(lambda: subscribed(base), 15, "the gateway subscribes again")
        assert poll.status()["progress"]["message"] == "while away"
        unannounced(database_url, audit_id, progress_message="missed again")
        time.sleep(3 * SHORT_TTL)
        assert poll.status()["progress"]["message"] == "while away"  # long again
        announced(progress_message="heard")
        wait_until(lambda: poll.status()["progress"]["message"] == "heard", 1.0, "announced")


def test_a_gateway_that_cannot_reach_redis_uses_the_short_ttl(
    tmp_path: Path, database_url: str, channel: str, seeded: tuple[str, str]
) -> None:
    secret, audit_id = seeded
    settings = {
        "broker_url": "redis://127.0.0.1:1/0",  # nothing listens there
        "poll_cache_seconds": str(SHORT_TTL),
        "poll_cache_subscribed_seconds": LONG,
        "audit_changes_channel": channel,
    }
    with gateway(tmp_path, database_url, **settings) as base:
        poll = Poller(base, secret, audit_id)
        assert poll.status()["status"] == "queued"
        assert not subscribed(base)
        unannounced(database_url, audit_id, status="running")
        lag = wait_until(
            lambda: poll.status()["status"] == "running", 2 * SHORT_TTL + 0.5, "unsubscribed"
        )
        assert lag <= 2 * SHORT_TTL + 0.5


WORKER_REDIS = redis_url(7)  # this test's own broker database


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_real_worker_finishing_an_audit_is_seen_within_a_second(
    tmp_path: Path, database_url: str, channel: str, broker: redis.Redis
) -> None:
    """A Celery worker (the fake runner: a quick audit) over the real broker; a gateway with
    both cache times long; the poll sees `succeeded` within 1 s of the database."""
    from tests.workers.conftest import add_audit, add_model, celery_worker_argv, worker_env

    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url=WORKER_REDIS,
        audit_changes_channel=channel,
        lease_seconds=3.0,
        heartbeat_seconds=0.3,
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    db = sessionmaker(bind=engine, expire_on_commit=False)
    with db() as session:
        model = add_model(session, settings)
        tenant_name = session.scalar(select(Tenant.name).where(Tenant.id == model.tenant_id))
        assert tenant_name is not None
        secret = create_api_key(session, tenant_name)
        audit = add_audit(session, model)
    env = worker_env(settings, "tests.workers.fakes.report")
    env["TIGHTROPE_AUDIT_CHANGES_CHANNEL"] = channel
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        celery_worker_argv(f"feed-{uuid.uuid4().hex[:6]}"),
        env=env,
        cwd=Path(__file__).resolve().parents[3],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    gateway_settings = {
        "broker_url": WORKER_REDIS,
        "poll_cache_seconds": LONG,
        "poll_cache_subscribed_seconds": LONG,
        "audit_changes_channel": channel,
    }
    heard = redis.Redis.from_url(WORKER_REDIS).pubsub()
    heard.subscribe(channel)
    try:
        with gateway(tmp_path, database_url, **gateway_settings) as base:
            wait_until(lambda: subscribed(base), 15, "the gateway subscribes")
            poll = Poller(base, secret, audit.id)
            assert poll.status()["status"] == "queued"
            assert Dispatcher.from_settings(settings).audit(audit.id)
            seen_in_db: float | None = None
            seen_by_poll: float | None = None
            deadline = time.monotonic() + 120
            with db() as session:
                while seen_by_poll is None:
                    assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                    session.commit()  # a fresh snapshot
                    status = session.scalar(select(Audit.status).where(Audit.id == audit.id))
                    if status == "succeeded" and seen_in_db is None:
                        seen_in_db = time.monotonic()
                    if poll.status()["status"] == "succeeded":
                        seen_by_poll = time.monotonic()
                        seen_in_db = seen_in_db or seen_by_poll
                    time.sleep(0.01)
            assert seen_in_db is not None
            assert seen_by_poll - seen_in_db < 1.0
            assert poll.listed()["status"] == "succeeded"
        # Every write of the worker named its audit (and tenant): none made the gateways
        # forget everything.
        announced = []
        while (message := heard.get_message(timeout=0.5)) is not None:
            if message["type"] == "message":
                announced.append(json.loads(message["data"]))
        assert len(announced) >= 3, announced  # running, planned, ..., succeeded
        assert all(m == {"audits": [[audit.id, model.tenant_id]]} for m in announced), announced
    finally:
        heard.close()
        os.killpg(worker.pid, 9)
        worker.wait(timeout=10)
        log.close()
        engine.dispose()
        redis.Redis.from_url(WORKER_REDIS).flushdb()
