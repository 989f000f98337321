"""Limits at the edge (issue 11): header size under the real server, JSON body size and depth,
multipart bodies cut short (docs/security.md, "Request limits")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.body_limits import json_depth_exceeds
from service.settings import Settings
from tests.service.api.test_uvicorn_smoke import free_port, wait_until_serving
from tests.service.conftest import (
    REDIS_URL,
    ModelFiles,
    assert_problem,
    make_settings,
    new_key,
    ready_model,
)

# timing bounds of a second or two: run alone, not beside other tests (Makefile)
pytestmark = pytest.mark.serial

MiB = 1024 * 1024


@pytest.fixture
def sqlite_client(tmp_path: Path, broker: redis.Redis) -> Iterator[TestClient]:
    """The gateway over SQLite only: these limits do not depend on the database."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'edge.db'}")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def audit_body(sqlite_client: TestClient, model_files: ModelFiles) -> Any:
    auth = new_key(sqlite_client)
    model_id = ready_model(sqlite_client, auth, model_files.torchscript)
    body = {
        "model_id": model_id,
        "dataset": {"builtin": "shepp_logan", "count": 1, "size": 16},
        "operator": {"kind": "mri", "acceleration": 4},
        "checks": [{"kind": "lipschitz", "iterations": 3}],
    }
    return auth, body


def test_defaults_are_documented_values() -> None:
    fields = Settings.model_fields
    assert fields["max_header_bytes"].default == 16 * 1024
    assert fields["max_json_body_bytes"].default == MiB
    assert fields["max_json_depth"].default == 64


def test_json_body_over_the_cap_is_413_before_the_app_reads_it(
    sqlite_client: TestClient, audit_body: Any
) -> None:
    auth, body = audit_body
    ok = sqlite_client.post("/v1/audits", headers=auth, json=body)
    assert ok.status_code == 202, ok.text
    big = json.dumps({**body, "padding": "x" * (2 * MiB)}).encode()
    headers = {**auth, "Content-Type": "application/json"}
    refused = sqlite_client.post("/v1/audits", headers=headers, content=big)
    problem = assert_problem(refused, 413, "payload-too-large")
    assert str(MiB) in problem["detail"]


def test_chunked_json_body_is_capped_as_it_streams(
    sqlite_client: TestClient, audit_body: Any
) -> None:
    auth, body = audit_body

    def chunks() -> Iterator[bytes]:
        yield json.dumps(body)[:-1].encode() + b', "padding": "'
        for _ in range(64):  # 4 MiB, 64 KiB a chunk, never a Content-Length
            yield b"x" * (64 * 1024)
        yield b'"}'

    headers = {**auth, "Content-Type": "application/json"}
    refused = sqlite_client.post("/v1/audits", headers=headers, content=chunks())
    assert_problem(refused, 413, "payload-too-large")
    assert "content-length" not in {k.lower() for k in refused.request.headers}


def test_deep_json_is_refused_cheaply(sqlite_client: TestClient, audit_body: Any) -> None:
    auth, _ = audit_body
    headers = {**auth, "Content-Type": "application/json"}
    deep = b"[" * 100_000 + b"]" * 100_000
    start = time.monotonic()
    refused = sqlite_client.post("/v1/audits", headers=headers, content=deep)
    assert time.monotonic() - start < 2
    problem = assert_problem(refused, 400, "bad-request")
    assert "deeper than 64" in problem["detail"]
    # Within the limit the body reaches validation (and fails it for its own reasons).
    shallow = b'{"model_id": ' + b"[" * 60 + b"]" * 60 + b"}"
    assert_problem(
        sqlite_client.post("/v1/audits", headers=headers, content=shallow), 422, "validation-failed"
    )


def test_depth_counts_brackets_outside_strings_only() -> None:
    assert not json_depth_exceeds(b'{"a": "[[[[[[[[[[[[", "b": "\\"[[[["}', 2)
    assert not json_depth_exceeds(b"[[1, [2]], {}]", 3)
    assert json_depth_exceeds(b"[[1, [2]], {}]", 2)
    assert json_depth_exceeds(b'{"a": {"b": {"c": 1}}}', 2)


def _multipart(spec: str, payload: bytes, boundary: str, *, closed: bool) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{spec}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="tiny.pt"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode(),
        payload,
    ]
    if closed:
        parts.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts)


def test_multipart_without_its_closing_boundary_is_refused(
    sqlite_client: TestClient, model_files: ModelFiles
) -> None:
    from tests.service.conftest import SPEC

    auth = new_key(sqlite_client)
    boundary = "edge-test-boundary"
    headers = {**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    payload = model_files.torchscript.read_bytes()
    spec = json.dumps(SPEC)
    cut = _multipart(spec, payload, boundary, closed=False)
    problem = assert_problem(
        sqlite_client.post("/v1/models", headers=headers, content=cut), 400, "malformed-request"
    )
    assert "closing boundary" in problem["detail"]
    assert sqlite_client.get("/v1/models", headers=auth).json()["items"] == []
    whole = _multipart(spec, payload, boundary, closed=True)
    accepted = sqlite_client.post("/v1/models", headers=headers, content=whole)
    assert accepted.status_code == 202, accepted.text


# -- The real server: `tightrope serve` runs service.api.server.run -------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {
        **os.environ,
        "TIGHTROPE_DATA_DIR": str(tmp_path),
        "TIGHTROPE_DATABASE_URL": f"sqlite:///{tmp_path / 'served.db'}",
        "TIGHTROPE_BROKER_URL": REDIS_URL,
    }
    argv = [sys.executable, "-m", "service.api.server", "127.0.0.1", str(port)]
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", server)
        yield "127.0.0.1", port
    finally:
        server.terminate()
        server.wait(timeout=10)


def _raw_get(address: tuple[str, int], header_bytes: int) -> tuple[bytes, float]:
    """GET /healthz with one header of `header_bytes`, sent in 16 KiB pieces until the server
    stops reading; the bytes answered (b"" if the connection was reset) and the seconds taken."""
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
        + b"a" * header_bytes
        + b"\r\n\r\n"
    )
    start = time.monotonic()
    answer = b""
    with socket.create_connection(address, timeout=5) as sock:
        try:
            for offset in range(0, len(request), 16 * 1024):
                sock.sendall(request[offset : offset + 16 * 1024])
        except OSError:
            pass  # the server answered and closed while we were still sending
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer, time.monotonic() - start


def test_a_huge_header_is_refused_at_once_and_others_are_served(
    served: tuple[str, int],
) -> None:
    host, port = served
    results: list[tuple[bytes, float]] = []
    big = threading.Thread(target=lambda: results.append(_raw_get(served, MiB)))
    # A client stuck in the middle of its headers holds nothing but its own buffer.
    with socket.create_connection(served, timeout=5) as stuck:
        stuck.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 8192)
        big.start()
        health = httpx.get(f"http://{host}:{port}/healthz", timeout=1)
        big.join(timeout=5)
    assert health.status_code == 200
    ((answer, seconds),) = results
    assert seconds < 1, seconds
    # 431 reaches the client unless the reset of the unread rest overtook it.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:200]
    # The limit holds for a request that arrives whole in one read too, to the byte.
    overhead = len(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: \r\n\r\n")
    over, _ = _raw_get(served, 16 * 1024 - overhead + 1)
    assert over.startswith(b"HTTP/1.1 431 "), over[:200]
    at_limit, _ = _raw_get(served, 16 * 1024 - overhead)
    assert at_limit.startswith(b"HTTP/1.1 200 "), at_limit[:200]
    # Headers under the limit are served as before.
    fine, _ = _raw_get(served, 8 * 1024)
    assert fine.startswith(b"HTTP/1.1 200 "), fine[:200]


def test_the_header_limit_holds_for_each_request_of_a_kept_alive_connection(
    served: tuple[str, int],
) -> None:
    """Two requests in one write on one connection: the first is served, the second, whose
    headers are over the limit, is refused with 431 and the connection closed."""
    small = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (17 * 1024) + b"\r\n\r\n"
    answer = b""
    with socket.create_connection(served, timeout=5) as sock:
        sock.sendall(small + big)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 431 " in answer, answer[:400]


def test_a_slow_upload_holds_no_database_slot_that_polls_need(tmp_path: Path) -> None:
    """One database slot, polls wait for it at most 1 s: an upload whose client sends its body
    slowly (here: never finishes it) must not keep the slot, or every poll is answered 503."""
    from sqlalchemy.orm import Session

    from service.db.keys import create_api_key
    from service.db.session import make_engine

    port = free_port()
    database = f"sqlite:///{tmp_path / 'served.db'}"
    env = {
        **os.environ,
        "TIGHTROPE_DATA_DIR": str(tmp_path),
        "TIGHTROPE_DATABASE_URL": database,
        "TIGHTROPE_BROKER_URL": REDIS_URL,
        "TIGHTROPE_DB_POOL_SIZE": "1",
        "TIGHTROPE_DB_QUEUE_TIMEOUT_SECONDS": "1",
        "TIGHTROPE_API_KEY_CACHE_SECONDS": "0",  # every request looks its key up
    }
    argv = [sys.executable, "-m", "service.api.server", "127.0.0.1", str(port)]
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", server)
        engine = make_engine(database)
        with Session(engine) as session:
            key = create_api_key(session, "slow-uploader")
        engine.dispose()
        boundary = "slowslowslow"
        head = (
            f"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {50 * MiB}\r\n\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="model.pt"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as upload:
            upload.sendall(head + b"\0" * 65536)  # ... and the rest never comes
            time.sleep(0.5)  # the gateway is now streaming this body
            polls = [
                httpx.get(
                    f"http://127.0.0.1:{port}/v1/models",
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=10,
                )
                for _ in range(3)
            ]
        assert [poll.status_code for poll in polls] == [200, 200, 200], polls[-1].text
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # once seen in CI (not reproduced): the gateway took over 10 s to stop after this
            # test; what is tested above is the slot, so end it rather than fail here
            server.kill()
            server.wait(timeout=10)


def test_a_client_that_leaves_mid_upload_is_logged_without_a_traceback(
    sqlite_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The body stops with `http.disconnect`, as uvicorn reports a closed connection: a line at
    INFO, no "unhandled error" and no traceback; the answer (read by nobody) is a 400 problem."""
    import anyio

    auth = new_key(sqlite_client)
    boundary = "gone"
    first = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        'filename="model.pt"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode() + b"\0" * 1024
    messages = [
        {"type": "http.request", "body": first, "more_body": True},
        {"type": "http.disconnect"},
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/models",
        "raw_path": b"/v1/models",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", auth["Authorization"].encode()),
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"content-length", b"4096"),
        ],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    caplog.set_level("INFO")
    anyio.run(sqlite_client.app, scope, receive, send)  # type: ignore[arg-type]
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 400
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not [r for r in caplog.records if r.exc_info]
    assert any("client disconnected during POST /v1/models" in r.message for r in caplog.records)
