"""The real server: uvicorn runs the app factory; one authenticated request over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session

from service.db.keys import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import make_engine
from tests.service.conftest import REDIS_URL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_serving(base: str, server: subprocess.Popen[bytes]) -> None:
    """Poll /healthz until the gateway answers 200 (30 s at most; fails if the process dies)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        assert time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.2)


@pytest.mark.needs("redis")
def test_uvicorn_serves_the_factory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'smoke.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    with Session(engine) as session:
        secret = create_api_key(session, "smoke")
    engine.dispose()
    port = free_port()
    env = {
        **os.environ,
        "TIGHTROPE_DATA_DIR": str(tmp_path),
        "TIGHTROPE_DATABASE_URL": url,
        "TIGHTROPE_BROKER_URL": REDIS_URL,
    }
    argv = [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app"]
    server = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, server)
        response = httpx.get(
            f"{base}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=5
        )
        assert response.status_code == 200 and response.json()["items"] == []
        unauthorised = httpx.get(f"{base}/v1/models", timeout=5)
        assert unauthorised.status_code == 401
        assert unauthorised.headers["content-type"] == "application/problem+json"
    finally:
        server.terminate()
        server.wait(timeout=10)
