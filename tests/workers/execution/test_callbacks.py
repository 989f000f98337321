"""callback_url deliveries against real receivers on loopback, with the real database: the
HMAC signature the receiver checks, retries with backoff after a failing receiver (through the
Celery task itself, run eagerly), no redirect followed, the hook on a finished audit, and the
destination check at send time (internal addresses, the allow-list, DNS rebinding, the
connection pinned to the checked address). Loopback is allowed here by the allow-list in
`settings`; no connection may leave the machine (`loopback_only`)."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from schemas.callback_targets import check_target
from service.db import session as db_session
from service.db.tables import Audit
from service.settings import Settings, get_settings
from service.signing import callbacks as callback_signing
from tests.workers.conftest import REQUEST, add_audit, add_model, fast_settings
from workers.execution.audit_job import Sends, execute_audit
from workers.execution.callbacks import Delivery, backoff_seconds, deliver_callback


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse any connection to an address that is not loopback: nothing leaves the machine,
    whatever a test (or a broken check) asks for."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = ipaddress.ip_address(str(address[0]).split("%")[0])
            if not host.is_loopback:
                raise ConnectionRefusedError(f"test guard: no traffic to {host}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """The receivers listen on 127.0.0.1: the allow-list lets callbacks reach them."""
    (tmp_path / "data").mkdir(exist_ok=True)
    return fast_settings(tmp_path, database_url, callback_allow="127.0.0.1")


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
    monkeypatch.setenv("TIGHTROPE_CALLBACK_ALLOW", settings.callback_allow)
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
    from workers.execution.tasks import send_callback

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
    sends = Sends(audit=lambda *a: None, shards=lambda *a: None, callback=notified.append)
    model = add_model(session, settings, status="rejected")
    audit = add_audit(session, model, request=dict(REQUEST, callback_url="http://127.0.0.1:9/"))
    silent = add_audit(session, model)
    for item in (audit, silent):
        result = execute_audit(item.id, settings=settings, session=session, sends=sends)
        assert result == "failed"
    assert notified == [audit.id]


HOOK_HOST = "hooks.example.test"


def fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: list[str | None]) -> list[str]:
    """Resolve HOOK_HOST to the next of `answers` (None: does not resolve; the last answer
    repeats); other names go to the real resolver. Returns the list of lookups of HOOK_HOST."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != HOOK_HOST:
            return real(host, port, *args, **kwargs)
        answer = answers[min(len(lookups), len(answers) - 1)]
        lookups.append(host)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, int(port or 0)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def _port(url: str) -> int:
    return int(url.split("/")[2].rsplit(":", 1)[1])


def test_internal_destinations_are_refused_at_send_time(
    session: Session, tmp_path: Path, database_url: str, receivers: MakeReceiver
) -> None:
    """Without the allow-list, a receiver on loopback is never reached, however it is spelt
    (the stored URL is not trusted: the worker checks it again)."""
    strict = fast_settings(tmp_path, database_url)
    receiver = receivers()
    port = _port(receiver.url)
    for url in (
        receiver.url,
        f"http://0x7f000001:{port}/hook",
        f"http://2130706433:{port}/hook",
        f"http://127.1:{port}/hook",
        f"http://[::ffff:127.0.0.1]:{port}/hook",
        f"http://[::1]:{port}/hook",
        f"http://localhost:{port}/hook",
        f"http://localhost.:{port}/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/hook",
    ):
        audit = _finished_audit(session, strict, url)
        outcome = deliver_callback(session, strict, audit.id)
        assert outcome.delivery is Delivery.REFUSED, (url, outcome)
        assert outcome.detail.startswith("destination refused: "), outcome
    assert receiver.received == []


def test_the_allow_list_names_host_and_port(
    session: Session, settings: Settings, receivers: MakeReceiver
) -> None:
    receiver = receivers()
    port = _port(receiver.url)
    audit = _finished_audit(session, settings, receiver.url)
    exact = settings.model_copy(update={"callback_allow": f"127.0.0.1:{port}"})
    assert deliver_callback(session, exact, audit.id).delivery is Delivery.DELIVERED
    other_port = settings.model_copy(update={"callback_allow": f"127.0.0.1:{port + 1}"})
    outcome = deliver_callback(session, other_port, audit.id)
    assert outcome.delivery is Delivery.REFUSED and "loopback" in outcome.detail
    assert len(receiver.received) == 1


def test_dns_rebinding_is_refused_at_send_time(
    session: Session,
    tmp_path: Path,
    database_url: str,
    receivers: MakeReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The name is public when the gateway checks it, loopback when the worker sends."""
    strict = fast_settings(tmp_path, database_url)
    receiver = receivers()
    url = receiver.url.replace("127.0.0.1", HOOK_HOST)
    lookups = fake_resolver(monkeypatch, ["93.184.216.34", "127.0.0.1"])
    check_target(url, strict.callback_allow_list, timeout=1.0)  # what the gateway does
    audit = _finished_audit(session, strict, url)
    outcome = deliver_callback(session, strict, audit.id)
    assert outcome.delivery is Delivery.REFUSED, outcome
    assert f"'{HOOK_HOST}' resolves to 127.0.0.1 is a loopback address" in outcome.detail
    assert receiver.received == [] and len(lookups) == 2


def test_the_post_goes_to_the_checked_address(
    session: Session, settings: Settings, receivers: MakeReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolved once, then connected to that address with the original Host: a second lookup
    (here: one that fails) is never made."""
    receiver = receivers()
    url = receiver.url.replace("127.0.0.1", HOOK_HOST)
    lookups = fake_resolver(monkeypatch, ["127.0.0.1", None])
    audit = _finished_audit(session, settings, url)
    outcome = deliver_callback(session, settings, audit.id)
    assert outcome.delivery is Delivery.DELIVERED, outcome
    ((headers, _),) = receiver.received
    assert headers["Host"] == url.split("/")[2] and lookups == [HOOK_HOST]
    # a host that does not resolve at send time is retried, like a connection error
    outcome = deliver_callback(session, settings, audit.id)
    assert outcome.delivery is Delivery.RETRY and "does not resolve" in outcome.detail


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_keeps_the_host_name_for_tls(
    session: Session, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connected to the checked IP, the TLS handshake still names the host (SNI) and the
    certificate is verified (here it is self-signed, so the delivery fails and is retried)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*_self_signed(tmp_path, HOOK_HOST))
    server_names: list[str | None] = []

    def on_sni(_sock: Any, name: str | None, _ctx: Any) -> None:
        server_names.append(name)

    context.sni_callback = on_sni
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    fake_resolver(monkeypatch, ["127.0.0.1", None])
    url = f"https://{HOOK_HOST}:{listener.getsockname()[1]}/hook"
    audit = _finished_audit(session, settings, url)
    outcome = deliver_callback(session, settings, audit.id)
    thread.join(10)
    listener.close()
    assert outcome.delivery is Delivery.RETRY and "CERTIFICATE_VERIFY_FAILED" in outcome.detail
    assert server_names == [HOOK_HOST]


def test_an_environment_proxy_is_used_after_the_check(
    session: Session,
    tmp_path: Path,
    database_url: str,
    receivers: MakeReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `http_proxy` set, the checked request goes to the proxy (here a receiver on
    loopback that answers 200 itself: nothing is forwarded); an internal destination is still
    refused before any connection."""
    strict = fast_settings(tmp_path, database_url)
    proxy = receivers()
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy.url.removesuffix("/hooks/tightrope"))
    public = _finished_audit(session, strict, "http://93.184.216.34/hook")
    assert deliver_callback(session, strict, public.id).delivery is Delivery.DELIVERED
    inside = _finished_audit(session, strict, "http://10.0.0.1/hook")
    assert deliver_callback(session, strict, inside.id).delivery is Delivery.REFUSED
    ((headers, _),) = proxy.received
    assert headers["Host"] == "93.184.216.34"


def test_task_does_not_retry_a_refused_destination(
    session: Session, settings: Settings, task_env: None
) -> None:
    from workers.execution.tasks import send_callback

    audit = _finished_audit(session, settings, "http://169.254.169.254/latest/meta-data/")
    result = send_callback.apply(args=[audit.id])
    assert result.successful() and result.result == "refused"
