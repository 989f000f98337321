"""Downloads from a bucket sent to a presigned URL (`TIGHTROPE_STORAGE_PRESIGN_SECONDS`), against
a real S3-protocol server (moto's, on loopback): off by default (streamed through the gateway);
on, an artifact or report.json is a 307 to a short-lived URL of the object that answers its
bytes with the media type (and attachment name) the gateway would send, while a document
(report.html, an HTML artifact) still comes through the gateway with its
Content-Security-Policy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from fastapi.testclient import TestClient

from schemas.canonical import canonical_json
from service.api.app import create_app
from service.db.tables import Artifact
from service.settings import Settings
from service.storage.stores import artifact_store, sha256_file
from tests.fixtures.s3_server import CREDENTIALS_ENV, REGION, MotoServer, moto_server
from tests.service.api.test_audit_routes import audit_request, set_audit, submit
from tests.service.conftest import (
    ModelFiles,
    make_settings,
    new_key,
    ready_model,
    sessions_of,
)
from tests.service.reports.sample import make_report


@pytest.fixture(scope="module")
def s3_server() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


FILES = {
    "report.json": ("application/json", canonical_json(make_report()).encode()),
    "report.html": ("text/html", b"<!DOCTYPE html><title>r</title>"),
    "figure.png": ("image/png", b"\x89PNG fake figure"),
}


def _succeeded_audit_in_the_bucket(
    client: TestClient, auth: dict[str, str], model_file: Path, tmp_path: Path
) -> str:
    """An audit marked succeeded whose files are objects of the bucket (as a worker stores
    them: workers/execution/job_dirs.py, import_outputs), each with its Artifact row."""
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    model_id = ready_model(client, auth, model_file)
    audit_id: str = submit(client, auth, audit_request(model_id)).json()["id"]
    store = artifact_store(settings)
    with sessions_of(client)() as session:
        for name, (media_type, content) in FILES.items():
            staged = tmp_path / name
            staged.write_bytes(content)
            store.objects.put_file(f"{audit_id}/{name}", staged, sha256_file(staged))
            session.add(
                Artifact(
                    audit_id=audit_id,
                    name=name,
                    media_type=media_type,
                    sha256=sha256_file(staged),
                    size_bytes=len(content),
                    path=f"{audit_id}/{name}",
                )
            )
        session.commit()
    set_audit(
        client, audit_id, status="succeeded", verdict="fail", report_path=f"{audit_id}/report.json"
    )
    return audit_id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_downloads_go_to_a_presigned_url_only_when_asked_and_never_for_documents(
    tmp_path: Path,
    database_url: str,
    broker: object,
    s3_server: MotoServer,
    model_files: ModelFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.new_bucket()
    streamed = make_settings(
        tmp_path,
        database_url,
        storage_url=f"s3://{bucket}/p",
        storage_endpoint_url=s3_server.endpoint_url,
        storage_region=REGION,
    )
    assert streamed.storage_presign_seconds == 0  # off by default
    presigned = streamed.model_copy(update={"storage_presign_seconds": 60})

    with TestClient(create_app(presigned), raise_server_exceptions=False) as client:
        auth = new_key(client)
        audit_id = _succeeded_audit_in_the_bucket(client, auth, model_files.torchscript, tmp_path)
        for path, name in (("report", "report.json"), ("artifacts/figure.png", "figure.png")):
            media_type, content = FILES[name]
            response = client.get(
                f"/v1/audits/{audit_id}/{path}", headers=auth, follow_redirects=False
            )
            assert response.status_code == 307, (path, response.text)
            assert response.headers["cache-control"] == "no-store"
            location = response.headers["location"]
            assert location.startswith(f"{s3_server.endpoint_url}/{bucket}/p/artifacts/")
            query = parse_qs(urlparse(location).query)
            assert query["X-Amz-Expires"] == ["60"] and "X-Amz-Signature" in query
            fetched = httpx.get(location, timeout=10)  # no API key: the URL is the credential
            assert fetched.status_code == 200, fetched.text
            assert fetched.content == content, path
            assert fetched.headers["content-type"] == media_type, path
            if path.startswith("artifacts/"):
                disposition = fetched.headers["content-disposition"]
                assert disposition == f'attachment; filename="{name}"'
        # documents come through the gateway, with the report page's CSP
        for path in ("report.html", "artifacts/report.html"):
            response = client.get(
                f"/v1/audits/{audit_id}/{path}", headers=auth, follow_redirects=False
            )
            assert response.status_code == 200, path
            assert response.content == FILES["report.html"][1]
            assert response.headers["content-security-policy"].startswith("default-src 'none'")
        # no key, no URL
        response = client.get(f"/v1/audits/{audit_id}/report", follow_redirects=False)
        assert response.status_code == 401 and "location" not in response.headers

    with TestClient(create_app(streamed), raise_server_exceptions=False) as client:
        response = client.get(f"/v1/audits/{audit_id}/report", headers=auth, follow_redirects=False)
        assert response.status_code == 200
        assert response.content == FILES["report.json"][1]
