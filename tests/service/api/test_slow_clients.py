"""Slow clients at the edge (docs/security.md, "Slow clients"): the real gateway process,
started as `tightrope serve` starts it, under its own small open-file limit."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import REDIS_URL
from workers.cli.stack import free_port

# timing bounds of a second or two: run alone, not beside other tests (Makefile)
pytestmark = [pytest.mark.needs("redis"), pytest.mark.serial]

SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "


def _limit_files(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: it cannot raise what is set here
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


class Gateway:
    def __init__(self, tmp_path: Path, files: int | None = None, **settings: str) -> None:
        self.port = free_port()
        self.log = tmp_path / f"gateway-{self.port}.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TIGHTROPE_")},
            "TIGHTROPE_DATA_DIR": str(tmp_path),
            "TIGHTROPE_DATABASE_URL": f"sqlite:///{tmp_path / 'edge.db'}",
            "TIGHTROPE_BROKER_URL": REDIS_URL,
            **{f"TIGHTROPE_{k.upper()}": v for k, v in settings.items()},
        }
        argv = [sys.executable, "-m", "service.api.server", "127.0.0.1", str(self.port)]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_limit_files(files) if files else None,
            )
        deadline = time.monotonic() + 60
        while not self.healthy():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def healthy(self, source: str = "127.0.0.1", timeout: float = 2.0) -> bool:
        transport = httpx.HTTPTransport(local_address=source)
        try:
            with httpx.Client(transport=transport, timeout=timeout) as client:
                return client.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(timeout=15)
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(files: int | None = None, **settings: str) -> Gateway:
        gateway = Gateway(tmp_path, files, **settings)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            print(gateway.stop()[-4000:])


def _answer(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """What the server sends until it closes (b"" on a reset), and when it closed."""
    sock.settimeout(timeout)
    started, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got, time.monotonic() - started


def test_headers_that_trickle_are_answered_408_and_logged(start_gateway) -> None:
    gateway = start_gateway(header_timeout_seconds="1.5")
    trickling = gateway.connect()
    trickling.sendall(SLOW_HEAD)
    silent = gateway.connect()  # opens and never sends a byte
    started = time.monotonic()
    closed = False
    while time.monotonic() - started < 6:
        try:
            trickling.sendall(b"a")
        except OSError:
            closed = True
            break
        time.sleep(0.25)
        trickling.settimeout(0.01)
        try:
            if trickling.recv(4096, socket.MSG_PEEK):
                closed = True
                break
        except TimeoutError:
            pass
    assert closed, "a trickling header was never closed"
    assert time.monotonic() - started < 4.0
    answer, _ = _answer(trickling, 5)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    silent_answer, after = _answer(silent, 5)
    assert silent_answer.startswith(b"HTTP/1.1 408") and after < 4.0, silent_answer
    # a complete request on a fresh connection is untouched
    assert gateway.healthy()
    log = gateway.stop()
    assert "headers not complete within 1.5 s" in log, log[-2000:]
    assert "open-file limit" in log


def test_a_body_below_the_minimum_rate_is_closed(start_gateway) -> None:
    gateway = start_gateway(body_window_seconds="1", min_body_bytes_per_second="1000")
    sock = gateway.connect()
    sock.sendall(
        b"POST /v1/audits HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n{"
    )
    answer, after = _answer(sock, 8)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert after < 4.0
    # a body that arrives at speed is read and answered (401: no key, but read whole)
    fast = httpx.post(
        f"http://127.0.0.1:{gateway.port}/v1/audits", content=b"{" + b" " * 50_000 + b"}"
    )
    assert fast.status_code == 401, fast.text
    assert "body slower than 1000 bytes/s over 1 s" in gateway.stop()


def test_slow_clients_do_not_lock_out_the_rest(start_gateway) -> None:
    """The reported attack, scaled to a file limit of 256: more slow sockets from one address
    than the gateway has files, each sending a header one byte at a time. Every other client
    is still answered at once, further connections from that address get 429 at once, and the
    slow sockets are closed within the header time limit."""
    gateway = start_gateway(files=256, header_timeout_seconds="3")
    attackers: list[socket.socket] = []
    refused = 0
    for _ in range(300):
        sock = socket.socket()
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", gateway.port))
            sock.sendall(SLOW_HEAD)
        except OSError:
            refused += 1
            sock.close()
            continue
        attackers.append(sock)
    try:
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < 2.5:
            one = time.monotonic()
            assert gateway.healthy(source="127.0.0.2", timeout=2), "another client was locked out"
            assert time.monotonic() - one < 1.0
            answered += 1
            for sock in attackers:
                with contextlib.suppress(OSError):
                    sock.send(b"a")
            time.sleep(0.1)
        assert answered >= 5
        # the attacker's address holds at most its share: the rest got 429 at once
        too_many = 0
        for sock in attackers:
            sock.settimeout(0.05)
            try:
                if sock.recv(64, socket.MSG_PEEK).startswith(b"HTTP/1.1 429"):
                    too_many += 1
            except (TimeoutError, OSError):
                pass
        assert too_many >= 300 - 256 // 4, (too_many, refused)
        # past the header time limit every slow socket is closed
        time.sleep(3.5)
        still_open = 0
        for sock in attackers:
            sock.settimeout(0.05)
            try:
                sock.send(b"a")
                if not sock.recv(64, socket.MSG_PEEK):
                    continue
            except TimeoutError:
                still_open += 1
            except OSError:
                continue
        assert still_open == 0
    finally:
        for sock in attackers:
            sock.close()
    log = gateway.stop()
    assert "connections from one address" in log and "headers not complete" in log, log[-3000:]
