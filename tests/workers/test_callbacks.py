"""callback_url deliveries against real receivers on loopback, with the real database: the
HMAC signature the receiver checks, retries with backoff after a failing receiver (through the
Celery task itself, run eagerly), no redirect followed, and the hook on a finished audit."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy.orm import Session

from service import callback_signing
from service.db import session as db_session
from service.db.models import Audit
from service.settings import Settings, get_settings
from tests.workers.conftest import REQUEST, add_audit, add_model
from workers.audit_job import execute_audit
from workers.callbacks import Delivery, backoff_seconds, deliver_callback


@dataclass
class Receiver:
    """An HTTP server that answers POSTs with the scripted statuses (then 200)."""

    statuses: list[int] = field(default_factory=list)
    location: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


MakeReceiver = Callable[[], Receiver]


@pytest.fixture
def receivers() -> Iterator[MakeReceiver]:
    """Start receivers on free loopback ports; all are shut down after the test."""
    servers: list[ThreadingHTTPServer] = []

    def make() -> Receiver:
        receiver = Receiver()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append((dict(self.headers.items()), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        receiver.url = f"http://127.0.0.1:{server.server_port}/hooks/tightrope"
        return receiver

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def _finished_audit(
    session: Session, settings: Settings, url: str, status: str = "succeeded"
) -> Audit:
    model = add_model(session, settings)
    return add_audit(
        session, model, request=dict(REQUEST, callback_url=url), status=status, verdict="pass"
    )


def test_delivery_is_signed_for_the_tenant(
    session: Session, settings: Settings, receivers: MakeReceiver
) -> None:
    receiver = receivers()
    audit = _finished_audit(session, settings, receiver.url)
    outcome = deliver_callback(session, settings, audit.id)
    assert outcome.delivery is Delivery.DELIVERED
    ((headers, body),) = receiver.received
    status = json.loads(body)
    assert status["id"] == audit.id and status["status"] == "succeeded"
    assert status["verdict"] == "pass"
    secret = callback_signing.tenant_secret(settings, audit.tenant_id)
    header = headers[callback_signing.HEADER]
    assert callback_signing.verify_signature_header(secret, body, header)
    assert not callback_signing.verify_signature_header(secret, body + b" ", header)
    other_tenant = callback_signing.tenant_secret(settings, "tnt_other")
    assert not callback_signing.verify_signature_header(other_tenant, body, header)
    stale = int(header.split(",")[0].removeprefix("t=")) + 3600
    assert not callback_signing.verify_signature_header(secret, body, header, now=stale)


def test_redirects_are_never_followed(
    session: Session, settings: Settings, receivers: MakeReceiver
) -> None:
    elsewhere = receivers()
    bouncer = receivers()
    for location in (elsewhere.url, bouncer.url + "/same-host"):
        bouncer.statuses, bouncer.location = [302], location
        audit = _finished_audit(session, settings, bouncer.url)
        outcome = deliver_callback(session, settings, audit.id)
        assert outcome.delivery is Delivery.REFUSED and "302" in outcome.detail
    assert elsewhere.received == [] and len(bouncer.received) == 2


def test_unfinished_or_without_url_is_skipped(session: Session, settings: Settings) -> None:
    running = _finished_audit(session, settings, "http://127.0.0.1:9/x", status="running")
    assert deliver_callback(session, settings, running.id).delivery is Delivery.SKIPPED
    plain = add_audit(session, add_model(session, settings), status="succeeded")
    assert deliver_callback(session, settings, plain.id).delivery is Delivery.SKIPPED


def test_backoff_doubles_and_is_capped(settings: Settings) -> None:
    assert [backoff_seconds(settings, n) for n in range(4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff_seconds(settings, 30) == 600.0


@pytest.fixture
def task_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point the Celery task's own settings and sessions at this test's database."""
    monkeypatch.setenv("TIGHTROPE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TIGHTROPE_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("TIGHTROPE_CALLBACK_MAX_ATTEMPTS", "3")
    caches = (get_settings, db_session.get_engine, db_session.get_sessionmaker)
    for cached in caches:
        cached.cache_clear()
    yield
    db_session.get_engine().dispose()
    for cached in caches:
        cached.cache_clear()


def test_task_retries_a_failing_receiver_then_delivers(
    session: Session, settings: Settings, receivers: MakeReceiver, task_env: None
) -> None:
    from workers.tasks import send_callback

    flaky = receivers()
    flaky.statuses = [503, 500]
    audit = _finished_audit(session, settings, flaky.url)
    result = send_callback.apply(args=[audit.id])
    assert len(flaky.received) == 3
    assert result.successful()
    bodies = {body for _, body in flaky.received}
    assert len(bodies) == 1  # the same status each time

    down = receivers()
    down.statuses = [500, 500, 500, 500]
    audit = _finished_audit(session, settings, down.url)
    send_callback.apply(args=[audit.id])
    assert len(down.received) == 3  # TIGHTROPE_CALLBACK_MAX_ATTEMPTS, then it gives up

    refusing = receivers()
    refusing.statuses = [410]
    audit = _finished_audit(session, settings, refusing.url)
    send_callback.apply(args=[audit.id])
    assert len(refusing.received) == 1  # a 4xx is final


def test_finished_audit_enqueues_its_callback(session: Session, settings: Settings) -> None:
    """execute_audit hands a finished audit with a callback_url to `notify` (here: the model
    is gone, so the audit fails at once; a real runner is not needed to reach the hook)."""
    notified: list[str] = []
    model = add_model(session, settings, status="rejected")
    audit = add_audit(session, model, request=dict(REQUEST, callback_url="http://127.0.0.1:9/"))
    silent = add_audit(session, model)
    for item in (audit, silent):
        result = execute_audit(item.id, settings=settings, session=session, notify=notified.append)
        assert result == "failed"
    assert notified == [audit.id]
