"""Reports people act on, over HTTP: the JUnit rendering, the HTML's security headers, the
signing key, the tenant's callback secret, the model filter by sha256, and the callback of an
audit cancelled while queued (sent by the gateway; issue 5)."""

from __future__ import annotations

import json
import mimetypes
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from schemas.canonical import canonical_json
from service.api.app import create_app
from service.db.tables import Artifact
from service.queue.broker import QUEUE_ADMISSION
from service.reports import signatures as signing
from service.settings import Settings
from service.signing import callbacks as callback_signing
from service.storage.stores import sha256_file
from tests.fixtures.redis_dbs import redis_url
from tests.service.api.test_audit_routes import audit_request, set_audit, submit
from tests.service.conftest import (
    ModelFiles,
    assert_problem,
    broker_count,
    broker_messages,
    clear_queues,
    make_settings,
    new_key,
    ready_model,
    sessions_of,
    upload_model,
)
from tests.service.reports.sample import make_report

REPORTS_REDIS = redis_url(9)  # this file's own database on the shared Redis


def _succeeded_audit(
    client: TestClient, auth: dict[str, str], settings: Settings, model_id: str
) -> str:
    """An audit marked succeeded, with the sample report (and an HTML page) on disk."""
    audit_id: str = submit(client, auth, audit_request(model_id)).json()["id"]
    folder = settings.artifact_dir / audit_id
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(canonical_json(make_report()))
    (folder / "report.html").write_text("<!DOCTYPE html><title>r</title>")
    set_audit(
        client, audit_id, status="succeeded", verdict="fail", report_path=f"{audit_id}/report.json"
    )
    return audit_id


def test_junit_and_html_of_a_report(
    client: TestClient, auth: dict[str, str], settings: Settings, model_files: ModelFiles
) -> None:
    model_id = ready_model(client, auth, model_files.torchscript)
    audit_id = _succeeded_audit(client, auth, settings, model_id)
    response = client.get(f"/v1/audits/{audit_id}/report.junit.xml", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(response.content)
    assert root.get("tests") == "4" and root.get("failures") == "2"
    html = client.get(f"/v1/audits/{audit_id}/report.html", headers=auth)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert html.headers["content-security-policy"].startswith("default-src 'none'")
    other = new_key(client)
    assert_problem(client.get(f"/v1/audits/{audit_id}/report.junit.xml", headers=other), 404)
    queued = submit(client, auth, audit_request(model_id)).json()["id"]
    response = client.get(f"/v1/audits/{queued}/report.junit.xml", headers=auth)
    assert_problem(response, 409, "report-not-ready")


def test_html_artifacts_get_the_report_pages_security_headers(
    client: TestClient, auth: dict[str, str], settings: Settings, model_files: ModelFiles
) -> None:
    """An HTML (or SVG) artifact is a document a browser may render: it gets the same CSP as
    /report.html; other artifacts are served as before."""
    model_id = ready_model(client, auth, model_files.torchscript)
    audit_id = _succeeded_audit(client, auth, settings, model_id)
    folder = settings.artifact_dir / audit_id
    files = {
        "report.html": b"<!DOCTYPE html><script>alert(1)</script>",
        "figure.svg": b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
        "figure.png": b"\x89PNG fake",
    }
    with sessions_of(client)() as session:
        for name, content in files.items():
            if name != "report.html":
                (folder / name).write_bytes(content)
            session.add(
                Artifact(
                    audit_id=audit_id,
                    name=name,
                    # as the workers record it (workers/execution/job_dirs.py: import_outputs)
                    media_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
                    sha256="0" * 64,
                    size_bytes=len(content),
                    path=f"{audit_id}/{name}",
                )
            )
        session.commit()
    page = client.get(f"/v1/audits/{audit_id}/report.html", headers=auth)
    csp = page.headers["content-security-policy"]
    assert page.status_code == 200 and csp.startswith("default-src 'none'")
    for name in ("report.html", "figure.svg"):
        artifact = client.get(f"/v1/audits/{audit_id}/artifacts/{name}", headers=auth)
        assert artifact.status_code == 200, name
        assert artifact.headers["content-security-policy"] == csp, name
    png = client.get(f"/v1/audits/{audit_id}/artifacts/figure.png", headers=auth)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert "content-security-policy" not in png.headers


def test_signing_key_is_public_and_matches_the_key_file(
    client: TestClient, settings: Settings
) -> None:
    document = client.get("/v1/signing-key").json()  # no API key needed
    key = signing.load_private_key(signing.key_path(settings))
    assert document["key_id"] == signing.key_id(key.public_key())
    assert document["algorithm"] == "ed25519"
    pem = client.get("/v1/signing-key.pem")
    assert pem.headers["content-type"].startswith("application/x-pem-file")
    assert signing.key_id(signing.load_public_key(pem.content)) == document["key_id"]
    report = signing.sign_report(make_report(), key)
    assert signing.verify(report, signing.load_public_key(json.dumps(document).encode()))


def test_callback_secret_per_tenant(client: TestClient, settings: Settings) -> None:
    assert_problem(client.get("/v1/callback-secret"), 401, "unauthorized")
    first, second = new_key(client), new_key(client)
    secret_one = client.get("/v1/callback-secret", headers=first).json()["secret"]
    secret_two = client.get("/v1/callback-secret", headers=second).json()["secret"]
    assert secret_one != secret_two and len(secret_one) == 64
    assert secret_one == client.get("/v1/callback-secret", headers=first).json()["secret"]
    assert callback_signing.master_secret_path(settings).stat().st_mode & 0o077 == 0


def test_models_filtered_by_sha256(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    ts = upload_model(client, auth, model_files.torchscript).json()["id"]
    upload_model(client, auth, model_files.export)
    digest = sha256_file(model_files.torchscript)
    items = client.get("/v1/models", params={"sha256": digest}, headers=auth).json()["items"]
    assert [m["id"] for m in items] == [ts]
    other = client.get("/v1/models", params={"sha256": digest}, headers=new_key(client))
    assert other.json()["items"] == []
    bad = client.get("/v1/models", params={"sha256": "XYZ"}, headers=auth)
    assert_problem(bad, 422, "validation-failed")


@pytest.fixture
def callback_broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REPORTS_REDIS)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_cancelling_a_queued_audit_sends_its_callback(
    tmp_path: Path, database_url: str, callback_broker: redis.Redis, model_files: ModelFiles
) -> None:
    settings = make_settings(
        tmp_path, database_url, broker_url=REPORTS_REDIS, callback_allow="127.0.0.1:9"
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        auth = new_key(client)
        model_id = ready_model(client, auth, model_files.torchscript)
        body: dict[str, Any] = audit_request(model_id, callback_url="http://127.0.0.1:9/hook")
        with_callback = submit(client, auth, body).json()["id"]
        without = submit(client, auth, audit_request(model_id)).json()["id"]
        clear_queues(callback_broker)
        for audit_id in (with_callback, without):
            assert client.post(f"/v1/audits/{audit_id}/cancel", headers=auth).status_code == 202
        messages = [m for _, m in broker_messages(callback_broker, QUEUE_ADMISSION)]
        tasks = [(m["headers"]["task"], m["headers"]["argsrepr"]) for m in messages]
        assert tasks == [("tightrope.send_callback", repr([with_callback]))]
        assert broker_count(callback_broker) == 1  # the callback only: no audit message


def test_artifacts_and_reports_answer_byte_ranges_and_refuse_bad_ones_as_problems(
    client: TestClient, auth: dict[str, str], settings: Settings, model_files: ModelFiles
) -> None:
    model_id = ready_model(client, auth, model_files.torchscript)
    audit_id = _succeeded_audit(client, auth, settings, model_id)
    content = bytes(range(100))
    (settings.artifact_dir / audit_id / "worst.npy").write_bytes(content)
    with sessions_of(client)() as session:
        session.add(
            Artifact(
                audit_id=audit_id,
                name="worst.npy",
                media_type="application/octet-stream",
                sha256="0" * 64,
                size_bytes=len(content),
                path=f"{audit_id}/worst.npy",
            )
        )
        session.commit()
    url = f"/v1/audits/{audit_id}/artifacts/worst.npy"
    part = client.get(url, headers={**auth, "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == content[10:20]
    assert part.headers["content-range"] == "bytes 10-19/100"

    beyond = client.get(url, headers={**auth, "Range": "bytes=500-600"})
    assert_problem(beyond, 416, "range-not-satisfiable")
    assert beyond.headers["content-range"] == "bytes */100"
    assert_problem(client.get(url, headers={**auth, "Range": "lines=1-2"}), 400)

    report = client.get(f"/v1/audits/{audit_id}/report", headers={**auth, "Range": "bytes=0-0"})
    assert report.status_code == 206 and report.content == b"{"
