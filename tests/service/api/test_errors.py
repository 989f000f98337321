"""Every failure is a problem document; after a barrage of bad input the service still serves."""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from tests.fixtures import model_factory
from tests.service.conftest import ModelFiles, assert_problem, upload_model


def test_unknown_route_and_method_are_problems(client: TestClient, auth: dict[str, str]) -> None:
    assert_problem(client.get("/v1/nothing", headers=auth), 404, "not-found")
    assert_problem(client.put("/v1/models", headers=auth), 405, "method-not-allowed")


def _allow(response: httpx.Response) -> set[str]:
    return {method.strip() for method in response.headers["allow"].split(",")}


def test_405_allow_lists_every_method_of_the_path(client: TestClient, auth: dict[str, str]) -> None:
    """RFC 9110: `Allow` names every method the path supports, also when separate routes serve
    them (GET and DELETE /v1/models/{id} are two routes)."""
    for method in ("PUT", "POST", "PATCH"):
        response = client.request(method, "/v1/models/mdl_x", headers=auth)
        assert_problem(response, 405, "method-not-allowed")
        assert _allow(response) == {"GET", "DELETE"}, method
    response = client.get("/v1/audits/aud_x/cancel", headers=auth)  # POST only
    assert_problem(response, 405, "method-not-allowed")
    assert _allow(response) == {"POST"}
    response = client.put("/v1/models", headers=auth)
    assert _allow(response) == {"GET", "POST"}
    # every method listed is really served (it is not answered 405)
    for method in _allow(response):
        assert client.request(method, "/v1/models", headers=auth).status_code != 405, method


def test_unreadable_json_values_are_400_bad_request(
    client: TestClient, auth: dict[str, str]
) -> None:
    """A body that is JSON but cannot be read into values (a number over Python's 4300-digit
    limit, nesting deeper than the parser's recursion) is a 400 `bad-request`, as documented in
    docs/http-api.md and in the OpenAPI description of POST /v1/audits."""
    headers = {**auth, "content-type": "application/json"}
    for content in (b'{"seed": ' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000):
        response = client.post("/v1/audits", headers=headers, content=content)
        assert_problem(response, 400, "bad-request")
    malformed = client.post("/v1/audits", headers=headers, content=b"{not json")
    assert_problem(malformed, 422, "validation-failed")
    operation = client.get("/openapi.json").json()["paths"]["/v1/audits"]["post"]
    assert {"400", "401", "409", "422"} <= set(operation["responses"])


def test_unexpected_errors_are_500_problems_without_internals(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal path /srv/db password=hunter2")

    with TestClient(app, raise_server_exceptions=False) as client:
        body = assert_problem(client.get("/boom"), 500, "internal-error")
    assert "hunter2" not in str(body) and "RuntimeError" not in str(body)


def test_openapi_documents_problem_responses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    # the report-signing public key is public on purpose: anyone may verify a report
    public = {"/v1/signing-key", "/v1/signing-key.pem"}
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            if path.startswith("/v1/") and path not in public:
                assert "401" in operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    content = response["content"]
                    assert list(content) == ["application/problem+json"], (path, status)
    assert "Problem" in schema["components"]["schemas"]
    assert schema["paths"]["/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"]


def test_service_keeps_serving_after_bad_input(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles, tmp_path: Path
) -> None:
    bad_files = [
        model_factory.make_garbage(tmp_path / "g.pt"),
        model_factory.truncated_copy(model_files.export, tmp_path / "t.pt2"),
        model_factory.zip_with_entry(tmp_path / "z.pt", "../../x", base=model_files.torchscript),
        model_factory.zip_bomb(tmp_path / "b.pt", 4 * 1024**2),
    ]
    statuses = [upload_model(client, auth, path).status_code for path in bad_files]
    statuses.append(client.post("/v1/audits", headers=auth, content=b"\xff\xfe").status_code)
    statuses.append(
        client.post(
            "/v1/models",
            headers={**auth, "content-type": "multipart/form-data; boundary=x"},
            content=b"--x\r\ngarbage without headers",
        ).status_code
    )
    statuses.append(
        client.post(
            "/v1/models", headers={**auth, "content-type": "multipart/form-data"}, content=b"x"
        ).status_code
    )
    assert all(400 <= s < 500 for s in statuses), statuses
    assert client.get("/v1/models", headers=auth).status_code == 200
    assert client.get("/healthz").status_code == 200


def test_an_unreachable_database_is_503_with_retry_after(tmp_path: Path) -> None:
    """A database restart or failover is not the request's fault: 503 `not-ready`, never a
    500 (a real PostgreSQL URL whose server is not there)."""
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2",
        auto_migrate=False,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.get("/v1/audits", headers={"Authorization": "Bearer tr_nothing"})
        body = assert_problem(response, 503, "not-ready")
        assert "database is unreachable" in body["detail"]
        assert response.headers["retry-after"] == "5"


def test_deeply_nested_json_in_an_uploads_spec_is_400_like_a_json_body(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    """The multipart `spec` field is held to the depth limit of JSON bodies (max_json_depth,
    64): a 400 `bad-request` naming the limit, never a 422 "recursion limit" from the parser."""
    for depth in (100, 30_000):  # past the limit; past the parser's own recursion limit
        spec = '{"name": ' + "[" * depth + "]" * depth + "}"
        response = upload_model(client, auth, model_files.torchscript, spec)
        body = assert_problem(response, 400, "bad-request")
        assert "deeper than 64 levels (TIGHTROPE_MAX_JSON_DEPTH)" in body["detail"], body
        assert "'spec'" in body["detail"] and "recursion" not in body["detail"]
        response = client.post(
            "/v1/datasets",
            headers=auth,
            files={"file": ("x.npy", b"\x93NUMPY")},
            data={"spec": spec},
        )
        assert_problem(response, 400, "bad-request")
    # Nesting within the limit is read as before: a spec error names its field (422).
    shallow = '{"name": ' + "[" * 10 + "]" * 10 + "}"
    body = assert_problem(upload_model(client, auth, model_files.torchscript, shallow), 422)
    assert body["errors"][0]["loc"][:2] == ["spec", "name"]
