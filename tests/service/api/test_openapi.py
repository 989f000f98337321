"""The OpenAPI description says what the routes answer (media types, bodies, headers, the rules
of the request schemas), and a client generated from it by openapi-python-client works against
a real gateway: models, the signing key, a succeeded audit's reports and artifacts, polling."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.orm import Session

from schemas.audits import AuditRequest
from schemas.canonical import canonical_json
from schemas.problem import PROBLEM_MEDIA_TYPE
from service.api.app import create_app
from service.api.http_headers import REPORT_FILES
from service.api.signing_key import PEM_MEDIA_TYPE
from service.db.keys import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import make_engine
from service.db.tables import Artifact, Audit, Model
from service.reports.junit import MEDIA_TYPE as JUNIT_MEDIA_TYPE
from tests.fixtures.redis_dbs import redis_url
from tests.service.api.test_audit_routes import audit_request
from tests.service.api.test_poll_load import serve
from tests.service.conftest import SPEC, ModelFiles, make_settings
from tests.service.reports.sample import make_report

# openapi-python-client has no reader for these two types: it is told they are text (its
# documented `content_type_overrides`); docs/http-api.md gives the same configuration.
GENERATOR_CONFIG: dict[str, Any] = {
    "content_type_overrides": {JUNIT_MEDIA_TYPE: "text/plain", PEM_MEDIA_TYPE: "text/plain"},
    "post_hooks": [],  # no ruff run over the generated code: nothing here reads its style
}
CLIENT_PACKAGE = "tightrope_client"  # from the title, "Tightrope"
OPENAPI_REDIS = redis_url(10)  # this file's own database on the shared Redis
HTML_MEDIA_TYPE = REPORT_FILES["report.html"].split(";")[0]


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("openapi")
    app = create_app(make_settings(root, f"sqlite:///{root / 'data' / 'tightrope.db'}"))
    document: dict[str, Any] = app.openapi()
    return document


def operation(openapi: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    found: dict[str, Any] = openapi["paths"][path][method]
    return found


def response(openapi: dict[str, Any], method: str, path: str, status: int) -> dict[str, Any]:
    found: dict[str, Any] = operation(openapi, method, path)["responses"][str(status)]
    return found


def media_types(openapi: dict[str, Any], method: str, path: str, status: int) -> list[str]:
    return list(response(openapi, method, path, status).get("content", {}))


def required_headers(openapi: dict[str, Any], method: str, path: str, status: int) -> set[str]:
    headers = response(openapi, method, path, status).get("headers", {})
    return {name for name, header in headers.items() if header.get("required")}


def optional_headers(openapi: dict[str, Any], method: str, path: str, status: int) -> set[str]:
    headers = response(openapi, method, path, status).get("headers", {})
    return {name for name, header in headers.items() if not header.get("required")}


def operations(openapi: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in openapi["paths"].items():
        for method, op in methods.items():
            yield method, path, op


def documents(openapi: dict[str, Any], method: str, path: str, answer: httpx.Response) -> bool:
    """Whether the document lists this answer's status and media type for the operation."""
    entry = operation(openapi, method, path)["responses"].get(str(answer.status_code))
    if entry is None:
        return False
    declared = list(entry.get("content", {}))
    received = answer.headers.get("content-type", "").split(";")[0].strip()
    if not declared:
        return not answer.content
    return any(
        media.split(";")[0].strip() in (received, "*/*") or media == f"{received.split('/')[0]}/*"
        for media in declared
    )


AUDIT = "/v1/audits/{audit_id}"


def test_file_routes_declare_the_media_types_they_send(openapi: dict[str, Any]) -> None:
    string = {"type": "string"}
    html = response(openapi, "get", f"{AUDIT}/report.html", 200)
    assert html["content"] == {HTML_MEDIA_TYPE: {"schema": string}}
    junit = response(openapi, "get", f"{AUDIT}/report.junit.xml", 200)
    assert junit["content"] == {JUNIT_MEDIA_TYPE: {"schema": string}}
    pem = response(openapi, "get", "/v1/signing-key.pem", 200)
    assert pem["content"] == {PEM_MEDIA_TYPE: {"schema": string}}
    # Artifacts: bytes of the type recorded per file; a generated client takes the first.
    artifact = response(openapi, "get", f"{AUDIT}/artifacts/{{name}}", 200)["content"]
    assert list(artifact)[0] == "application/octet-stream" and "*/*" in artifact
    assert "application/json" not in artifact
    assert all(
        entry["schema"] == {"type": "string", "format": "binary"} for entry in artifact.values()
    )
    report = response(openapi, "get", f"{AUDIT}/report", 200)
    assert report["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/Report"}}
    }
    schema = openapi["components"]["schemas"]["Report"]
    assert {"verdict", "model", "checks"} <= set(schema["required"])
    key = response(openapi, "get", "/v1/signing-key", 200)["content"]["application/json"]
    assert key["schema"] == {"$ref": "#/components/schemas/SigningKey"}
    assert set(openapi["components"]["schemas"]["SigningKey"]["required"]) == {
        "algorithm",
        "key_id",
        "public_key_pem",
        "public_key",
    }


def test_every_body_has_a_schema_and_errors_are_problems(openapi: dict[str, Any]) -> None:
    for method, path, op in operations(openapi):
        assert "500" in op["responses"], (method, path)
        for status, entry in op["responses"].items():
            if status in ("204", "304", "307"):  # no body (307: the presigned redirect)
                assert "content" not in entry, (method, path, status)
                continue
            assert entry.get("content"), (method, path, status)
            for media, body in entry["content"].items():
                assert body.get("schema"), (method, path, status, media)
            if status.startswith(("4", "5")):
                assert list(entry["content"]) == [PROBLEM_MEDIA_TYPE], (method, path, status)


def test_every_reference_resolves(openapi: dict[str, Any]) -> None:
    names = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(openapi)))
    assert names and names <= set(openapi["components"]["schemas"])
    assert "HTTPValidationError" not in openapi["components"]["schemas"]


def test_response_headers(openapi: dict[str, Any]) -> None:
    assert required_headers(openapi, "post", "/v1/audits", 202) == {"Location", "Retry-After"}
    assert optional_headers(openapi, "post", "/v1/audits", 202) == {"Idempotent-Replayed"}
    assert optional_headers(openapi, "post", "/v1/audits", 409) == {"Retry-After"}
    assert required_headers(openapi, "post", "/v1/models", 202) == {"Location"}
    assert required_headers(openapi, "post", "/v1/datasets", 201) == {"Location"}
    for status in (200, 304):
        assert required_headers(openapi, "get", AUDIT, status) == {"ETag", "Cache-Control"}
    assert "content" not in response(openapi, "get", AUDIT, 304)
    assert required_headers(openapi, "get", f"{AUDIT}/report.html", 200) == {
        "Content-Security-Policy"
    }
    artifact = f"{AUDIT}/artifacts/{{name}}"
    assert required_headers(openapi, "get", artifact, 200) == {"Content-Disposition"}
    assert optional_headers(openapi, "get", artifact, 200) == {"Content-Security-Policy"}
    for name in ("report", "report.html", "report.junit.xml"):
        assert optional_headers(openapi, "get", f"{AUDIT}/{name}", 409) == {"Retry-After"}
    retry_after = {"type": "integer", "minimum": 0}
    for method, path, op in operations(openapi):
        responses = op["responses"]
        if "429" in responses:
            assert required_headers(openapi, method, path, 429) == {"Retry-After"}
        if "503" in responses:
            headers = responses["503"]["headers"]
            assert headers["Retry-After"]["schema"] == retry_after, (method, path)
            assert headers["Retry-After"]["required"] is (path != "/readyz"), (method, path)
        if "401" in responses:
            assert required_headers(openapi, method, path, 401) == {"WWW-Authenticate"}
        uses_database = path.startswith("/v1/") and "signing-key" not in path
        assert ("503" in responses) is (uses_database or path == "/readyz"), (method, path)


def test_request_rules_are_stated(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    for path in ("/v1/models", "/v1/datasets", "/v1/audits"):
        token = next(
            p for p in operation(openapi, "get", path)["parameters"] if p["name"] == "page_token"
        )
        assert "next_page_token" in token["description"] and "422" in token["description"]
        assert "422" in operation(openapi, "get", path)["responses"]
    for path, model in (("/v1/models", "ModelSpec"), ("/v1/datasets", "DatasetUploadSpec")):
        form = operation(openapi, "post", path)["requestBody"]["content"]["multipart/form-data"]
        assert form["schema"]["properties"]["spec"]["$ref"] == f"#/components/schemas/{model}"
        assert form["encoding"]["spec"]["contentType"] == "application/json"
        assert schemas[model]["type"] == "object" and schemas[model]["required"]
    positive = {"type": "number", "exclusiveMinimum": 0.0}
    for check in ("WorstCaseCheck", "RandomNoiseCheck"):
        items = schemas[check]["properties"]["levels"]["items"]
        assert positive.items() <= items.items() and items["maximum"] == 10.0
    for check in ("AdversarialCheck",):
        items = schemas[check]["properties"]["epsilons"]["items"]
        assert positive.items() <= items.items()
    more_samples = schemas["MoreSamplesCheck"]
    assert "exactly one of" in more_samples["description"]
    accelerations = more_samples["properties"]["accelerations"]["anyOf"][0]
    assert accelerations["items"] == {"type": "number", "minimum": 1.0, "maximum": 64.0}
    shape = schemas["ModelSpec"]["properties"]["image_shape"]["prefixItems"]
    assert [item["maximum"] for item in shape] == [16, 1024, 1024]


def discriminators(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "discriminator" in node:
            yield node["discriminator"]
        for value in node.values():
            yield from discriminators(value)
    elif isinstance(node, list):
        for value in node:
            yield from discriminators(value)


def test_union_tags_are_required(openapi: dict[str, Any]) -> None:
    """A check or operator without `kind` is refused (the union cannot pick a member), so each
    member's schema says `kind` is required."""
    schemas = openapi["components"]["schemas"]
    found = list(discriminators(openapi))
    assert {d["propertyName"] for d in found} == {"kind"}
    members = {ref.rsplit("/", 1)[1] for d in found for ref in d["mapping"].values()}
    assert {"LipschitzCheck", "MoreSamplesCheck", "MRIOperator", "AdversarialCheck"} <= members
    for member in members:
        assert "kind" in schemas[member]["required"], member


def test_documented_audit_examples_are_valid_requests(openapi: dict[str, Any]) -> None:
    body = operation(openapi, "post", "/v1/audits")["requestBody"]["content"]["application/json"]
    assert body["examples"]
    for example in body["examples"].values():
        AuditRequest.model_validate(example["value"])


# --- a generated client against a real gateway ---------------------------------------------


@contextmanager
def gateway(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """A uvicorn gateway over a fresh SQLite database, with a tenant's API key:
    (base URL, API key, database URL). Its data directory is tmp_path / "data"."""
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    with Session(engine) as session:
        secret = create_api_key(session, f"openapi-{uuid.uuid4().hex[:8]}")
    engine.dispose()
    broker = redis.Redis.from_url(OPENAPI_REDIS)
    broker.flushdb()
    server = serve(tmp_path, url, broker_url=OPENAPI_REDIS)
    base = next(server)
    try:
        yield base, secret, url
    finally:
        server.close()  # terminates uvicorn
        broker.flushdb()


def update_rows(url: str, model: type[Any], row_id: str, **values: Any) -> None:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            row = session.get(model, row_id)
            assert row is not None
            for name, value in values.items():
                setattr(row, name, value)
            session.commit()
    finally:
        engine.dispose()


def endpoint(tag: str, name: str) -> Any:
    """A module of the generated client's `api` package (one per operation)."""
    return importlib.import_module(f"{CLIENT_PACKAGE}.api.{tag}.{name}")


def generate_client(document: dict[str, Any], out: Path) -> Path:
    """openapi-python-client over the served document; fails on any warning it prints."""
    path = out / "openapi.json"
    path.write_text(json.dumps(document))
    config = out / "generator.json"
    config.write_text(json.dumps(GENERATOR_CONFIG))
    target = out / "client"
    argv = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(path)]
    argv += ["--output-path", str(target), "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "warning" not in output.lower() and "error" not in output.lower(), output
    return target


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[Path]:
    """Where the generated package will be; its modules are forgotten afterwards."""
    pytest.importorskip("openapi_python_client")  # a dev dependency: installed in CI
    out = tmp_path / "generated"
    out.mkdir()
    yield out
    for name in [
        m for m in sys.modules if m == CLIENT_PACKAGE or m.startswith(CLIENT_PACKAGE + ".")
    ]:
        del sys.modules[name]


@pytest.mark.needs("redis")  # a real gateway process
def test_a_generated_client_uses_the_api(
    tmp_path: Path, generated: Path, model_files: ModelFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    with gateway(tmp_path) as (base, secret, url):
        document = httpx.get(f"{base}/openapi.json", timeout=10).json()
        monkeypatch.syspath_prepend(str(generate_client(document, generated)))
        # Imported only now: the package was just written.
        package = importlib.import_module(CLIENT_PACKAGE)
        models = importlib.import_module(f"{CLIENT_PACKAGE}.models")
        File = importlib.import_module(f"{CLIENT_PACKAGE}.types").File
        read_pem = endpoint("signing", "read_signing_key_pem_v1_signing_key_pem_get")
        read_key = endpoint("signing", "read_signing_key_v1_signing_key_get")
        list_models = endpoint("models", "list_models_v1_models_get")
        upload_model = endpoint("models", "upload_model_v1_models_post")
        submit_audit = endpoint("audits", "submit_audit_v1_audits_post")
        read_audit = endpoint("audits", "read_audit_v1_audits_audit_id_get")
        read_report = endpoint("audits", "read_report_v1_audits_audit_id_report_get")
        read_html = endpoint("audits", "read_report_html_v1_audits_audit_id_report_html_get")
        read_junit = endpoint("audits", "read_report_junit_v1_audits_audit_id_report_junit_xml_get")
        read_artifact = endpoint("audits", "read_artifact_v1_audits_audit_id_artifacts_name_get")

        client = package.AuthenticatedClient(
            base_url=base, token=secret, raise_on_unexpected_status=True
        )
        anonymous = package.Client(base_url=base, raise_on_unexpected_status=True)

        def documented(method: str, path: str, answer: Any) -> None:
            raw = httpx.Response(
                int(answer.status_code), headers=dict(answer.headers), content=answer.content
            )
            assert documents(document, method, path, raw), (path, answer.status_code, raw.headers)

        # The signing key needs no API key; the PEM is text, not None.
        pem = read_pem.sync_detailed(client=anonymous)
        documented("get", "/v1/signing-key.pem", pem)
        assert isinstance(pem.parsed, str) and pem.parsed.startswith("-----BEGIN PUBLIC KEY-----")
        key = read_key.sync(client=anonymous)
        assert key is not None and key.public_key_pem == pem.parsed and key.algorithm == "ed25519"

        # Models: list (empty), upload with a typed spec (a JSON part), list again.
        empty = list_models.sync(client=client)
        assert isinstance(empty, models.ModelList) and empty.items == []
        wrong = list_models.sync(client=client, page_token="not-a-token")
        assert isinstance(wrong, models.Problem) and wrong.status == 422
        body = models.UploadModelV1ModelsPostBody(
            file=File(
                payload=BytesIO(model_files.torchscript.read_bytes()),
                file_name="tiny.pt",
                mime_type="application/octet-stream",
            ),
            spec=models.ModelSpec.from_dict(SPEC),
        )
        uploaded = upload_model.sync_detailed(client=client, body=body)
        documented("post", "/v1/models", uploaded)
        assert isinstance(uploaded.parsed, models.ModelResource), uploaded.content
        model_id = uploaded.parsed.id
        assert uploaded.headers["location"] == f"/v1/models/{model_id}"
        listed = list_models.sync(client=client)
        assert [m.id for m in listed.items] == [model_id]
        update_rows(url, Model, model_id, status="ready")

        # An audit: submitted with a typed body, then made `succeeded` as a worker would.
        request = models.AuditRequest.from_dict(audit_request(model_id))
        submitted = submit_audit.sync_detailed(client=client, body=request)
        documented("post", "/v1/audits", submitted)
        assert isinstance(submitted.parsed, models.AuditStatus), submitted.content
        audit_id = submitted.parsed.id
        assert submitted.headers["location"] == f"/v1/audits/{audit_id}"
        assert int(submitted.headers["retry-after"]) >= 0
        folder = tmp_path / "data" / "artifacts" / audit_id
        folder.mkdir(parents=True)
        (folder / "report.json").write_text(canonical_json(make_report()))
        (folder / "report.html").write_text("<!DOCTYPE html><title>report</title>")
        figure = b"\x89PNG\r\n\x1a\n fake"
        (folder / "figure.png").write_bytes(figure)
        engine = make_engine(url)
        with Session(engine) as session:
            session.add(
                Artifact(
                    audit_id=audit_id,
                    name="figure.png",
                    media_type="image/png",
                    sha256="0" * 64,
                    size_bytes=len(figure),
                    path=f"{audit_id}/figure.png",
                )
            )
            session.commit()
        engine.dispose()
        update_rows(
            url,
            Audit,
            audit_id,
            status="succeeded",
            verdict="fail",
            report_path=f"{audit_id}/report.json",
        )

        # Polling: ETag on the 200, and a 304 without body that the client does not choke on.
        polled = read_audit.sync_detailed(audit_id, client=client)
        documented("get", AUDIT, polled)
        assert polled.parsed.status == "succeeded" and polled.headers["cache-control"]
        again = read_audit.sync_detailed(
            audit_id, client=client, if_none_match=polled.headers["etag"]
        )
        documented("get", AUDIT, again)
        assert again.status_code == 304 and again.parsed is None and again.content == b""

        # The reports: JSON (typed), HTML and JUnit (text), an artifact (bytes).
        report = read_report.sync_detailed(audit_id, client=client)
        documented("get", f"{AUDIT}/report", report)
        assert isinstance(report.parsed, models.Report) and report.parsed.verdict == "fail"
        html = read_html.sync_detailed(audit_id, client=client)
        documented("get", f"{AUDIT}/report.html", html)
        assert html.parsed == "<!DOCTYPE html><title>report</title>"
        assert html.headers["content-security-policy"].startswith("default-src 'none'")
        junit = read_junit.sync_detailed(audit_id, client=client)
        documented("get", f"{AUDIT}/report.junit.xml", junit)
        assert isinstance(junit.parsed, str)
        assert ET.fromstring(junit.parsed).tag == "testsuites"
        artifact = read_artifact.sync_detailed(audit_id, "figure.png", client=client)
        documented("get", f"{AUDIT}/artifacts/{{name}}", artifact)
        assert artifact.parsed.payload.read() == figure
        assert "figure.png" in artifact.headers["content-disposition"]

        # Errors come back as typed problems.
        missing = read_html.sync(f"{audit_id}-none", client=client)
        assert isinstance(missing, models.Problem) and missing.status == 404
