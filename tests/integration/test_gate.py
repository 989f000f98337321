"""The CI gate against a real stack (gateway, supervised worker, Redis, sandboxed runner): the
report comes back signed by the key the gateway serves, with report.html and junit.xml; the
worker POSTs the finished audit to its callback_url with the tenant's HMAC; a second gate run
reuses the uploaded model."""

from __future__ import annotations

import json
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from service.reports import signatures as signing
from service.signing import callbacks as callback_signing
from tests.fixtures.redis_dbs import redis_url
from tests.integration.conftest import FAST_RECOVERY, MODEL_SPEC, SIZE, create_key
from workers.cli.main import app
from workers.cli.stack import LocalStack

pytestmark = pytest.mark.integration

GATE_REDIS = redis_url(9)  # this test's own database on the shared Redis


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    broker = redis.Redis.from_url(GATE_REDIS)
    broker.flushdb()
    local = LocalStack(
        data_dir=tmp_path / "data",
        broker_url=GATE_REDIS,
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        workers=1,
        # the callback receiver listens on loopback: the allow-list lets callbacks reach it
        extra_env={**FAST_RECOVERY, "TIGHTROPE_CALLBACK_ALLOW": "127.0.0.1"},
    )
    try:
        local.start()
        yield local
    finally:
        local.stop()
        broker.flushdb()
        broker.close()


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    received: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((dict(self.headers.items()), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()
    server.server_close()


def test_gate_against_a_real_stack(
    stack: LocalStack, receiver: tuple, model_file: Path, tmp_path: Path
) -> None:
    url, received = receiver
    key = create_key(stack)
    (tmp_path / "spec.json").write_text(json.dumps(MODEL_SPEC))
    config = {
        "dataset": {"builtin": "ellipses", "count": 1, "size": SIZE, "seed": 1},
        "operator": {"kind": "mri", "acceleration": 4, "center_fraction": 0.1, "seed": 0},
        "checks": [
            {"kind": "lipschitz", "iterations": 3, "threshold": {"max_jacobian_norm": 1e-6}}
        ],
        "device": "cpu",
        "callback_url": url,
    }
    (tmp_path / "audit.json").write_text(json.dumps(config))
    args = ["gate", "--model", str(model_file), "--spec", str(tmp_path / "spec.json")]
    args += ["--config", str(tmp_path / "audit.json"), "--server", stack.api_url, "--key", key]

    first = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert first.exit_code == 1, first.output  # the bound is far below any network's norm
    out = tmp_path / "one"
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "fail"
    served_key = httpx.get(f"{stack.api_url}/v1/signing-key.pem").content
    assert signing.verify(report, signing.load_public_key(served_key))
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "1"
    html = (out / "report.html").read_text()
    assert report["signature"]["key_id"] in html and ">fail</span>" in html

    # the worker announced the finished audit to the callback_url, signed for this tenant
    # (its next task after the audit: the gate may have seen `succeeded` a moment earlier)
    deadline = time.monotonic() + 30
    while not received and time.monotonic() < deadline:
        time.sleep(0.2)
    ((headers, body),) = received
    status = json.loads(body)
    assert status["id"] == report["audit_id"] and status["status"] == "succeeded"
    secret = httpx.get(
        f"{stack.api_url}/v1/callback-secret", headers={"Authorization": f"Bearer {key}"}
    ).json()["secret"]
    assert callback_signing.verify_signature_header(secret, body, headers[callback_signing.HEADER])

    second = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "two")])
    assert second.exit_code == 1 and "reusing" in second.output, second.output
