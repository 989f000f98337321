"""`POST /v1/endpoint-models`: an endpoint model is registered with its spec and limits, its
secret stored encrypted and never shown; bad registrations are 422 problems naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.db.tables import Model
from service.queue.broker import QUEUE_ADMISSION
from service.settings import Settings
from service.signing.endpoint_secrets import SecretUnreadable, decrypt
from tests.service.api.test_audit_routes import audit_request
from tests.service.conftest import (
    SPEC,
    assert_problem,
    broker_messages,
    new_key,
    sessions_of,
    set_model_status,
)

SECRET = "Bearer vendor-token-0123456789"
BODY: dict[str, Any] = {
    "url": "https://models.example.com/serving/",
    "model_name": "denoiser",
    "model_version": "3",
    "spec": SPEC,
    "auth": {"header": "Authorization", "secret": SECRET},
    "limits": {"requests_per_second": 5, "concurrency": 2, "timeout_seconds": 10, "max_batch": 8},
}


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: the route does nothing database-specific (migration 0009 is tested on both
    by tests/service/db/test_migrations.py)."""
    return f"sqlite:///{tmp_path / 'data' / 'tightrope.db'}"


def with_(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(BODY)
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def test_registration_stores_the_endpoint_and_sends_the_probe(
    client: TestClient, auth: dict[str, str], broker: redis.Redis
) -> None:
    response = client.post("/v1/endpoint-models", headers=auth, json=BODY)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/models/{body['id']}"
    assert (body["status"], body["format"], body["size_bytes"]) == ("validating", "endpoint", 0)
    assert body["endpoint"] == {
        "url": "https://models.example.com/serving",
        "model_name": "denoiser",
        "model_version": "3",
        "input_name": None,
        "output_name": None,
        "auth_header": "Authorization",
        "limits": BODY["limits"],
    }
    _, message = broker_messages(broker, QUEUE_ADMISSION)[-1]
    assert message["headers"]["argsrepr"] == repr([body["id"]])
    # write-only: no answer carries the secret, the row holds it encrypted for this model
    read = client.get(f"/v1/models/{body['id']}", headers=auth)
    listed = client.get("/v1/models", headers=auth)
    for answer in (response, read, listed):
        assert "vendor-token" not in answer.text
    assert read.json() == body
    with sessions_of(client)() as session:
        row = session.get(Model, body["id"])
        assert row is not None and row.endpoint_secret is not None
        assert "vendor-token" not in row.endpoint_secret and "vendor-token" not in str(row.endpoint)
        settings = client.app.state.settings  # type: ignore[attr-defined]
        assert decrypt(settings, row.id, row.endpoint_secret) == SECRET
        with pytest.raises(SecretUnreadable):  # bound to its row
            decrypt(settings, "mdl_other", row.endpoint_secret)


def test_the_same_endpoint_has_the_same_sha256(client: TestClient, auth: dict[str, str]) -> None:
    first = client.post("/v1/endpoint-models", headers=auth, json=BODY).json()
    again = client.post("/v1/endpoint-models", headers=auth, json=with_(auth=None)).json()
    other = client.post("/v1/endpoint-models", headers=auth, json=with_(model_version="4"))
    assert first["sha256"] == again["sha256"] != other.json()["sha256"]
    found = client.get("/v1/models", headers=auth, params={"sha256": first["sha256"]}).json()
    assert {m["id"] for m in found["items"]} == {first["id"], again["id"]}
    assert again["endpoint"]["auth_header"] is None


def test_the_limits_have_documented_defaults(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/endpoint-models", headers=auth, json=with_(limits=None))
    assert response.status_code == 202, response.text
    assert response.json()["endpoint"]["limits"] == {
        "requests_per_second": 20.0,
        "concurrency": 4,
        "timeout_seconds": 30.0,
        "max_batch": 16,
    }


@pytest.mark.parametrize(
    ("changes", "loc", "words"),
    [
        ({"url": "ftp://models.example.com"}, ["url"], "scheme must be http or https"),
        ({"url": "https://user:pw@models.example.com"}, ["url"], "credentials do not go"),
        ({"url": "https://models.example.com/?key=1"}, ["url"], "no query or fragment"),
        ({"url": "https:///v2"}, ["url"], "no host"),
        ({"model_name": "../admin"}, ["model_name"], "letters, digits"),
        ({"limits": {"concurrency": 1000}}, ["limits", "concurrency"], "less than or equal"),
        ({"limits": {"requests_per_second": 0}}, ["limits", "requests_per_second"], "greater"),
        ({"limits": {"max_batch": 5000}}, ["limits", "max_batch"], "less than or equal"),
        ({"limits": {"timeout_seconds": 301}}, ["limits", "timeout_seconds"], "less than"),
        ({"auth": {"header": "Content-Type", "secret": "x"}}, ["auth", "header"], "set by the"),
        ({"auth": {"header": "Bad Header", "secret": "x"}}, ["auth", "header"], "header name"),
        ({"auth": {"secret": "a\r\nX-Injected: 1"}}, ["auth", "secret"], "printable ASCII"),
        ({"spec": {**SPEC, "image_shape": [1, 0, 4]}}, ["spec", "image_shape", 1], "greater"),
        ({"spec": None}, ["spec"], "Field required"),
        ({"limits": {"bogus": 1}}, ["limits", "bogus"], "Extra inputs"),
    ],
)
def test_bad_registrations_are_422_naming_the_field(
    client: TestClient,
    auth: dict[str, str],
    changes: dict[str, Any],
    loc: list[str | int],
    words: str,
) -> None:
    response = client.post("/v1/endpoint-models", headers=auth, json=with_(**changes))
    problem = assert_problem(response, 422, "validation-failed")
    errors = [e for e in problem["errors"] if e["loc"] == ["body", *loc]]
    assert errors and words in errors[0]["msg"], problem["errors"]
    assert "vendor-token" not in response.text and "X-Injected" not in response.text


def test_registration_needs_a_key_and_json(client: TestClient, auth: dict[str, str]) -> None:
    assert_problem(client.post("/v1/endpoint-models", json=BODY), 401, "unauthorized")
    response = client.post("/v1/endpoint-models", headers=auth, content=b"{not json")
    assert_problem(response, 422)


def test_an_endpoint_model_is_audited_by_the_query_only_checks(
    client: TestClient, auth: dict[str, str], broker: redis.Redis
) -> None:
    model_id = client.post("/v1/endpoint-models", headers=auth, json=BODY).json()["id"]
    set_model_status(client, model_id, "ready")
    query_only = [
        {"kind": "random_noise", "levels": [0.01]},
        {"kind": "worst_case", "levels": [0.01]},
    ]
    response = client.post(
        "/v1/audits",
        headers=auth,
        json=audit_request(model_id, checks=query_only, budget={"queries": 5000}),
    )
    assert response.status_code == 202, response.text

    # a check that needs gradients or weights is named, with what an endpoint can run
    response = client.post("/v1/audits", headers=auth, json=audit_request(model_id))
    problem = assert_problem(response, 422, "validation-failed")
    assert "endpoint model" in problem["detail"] and "random_noise" in problem["detail"]
    assert problem["errors"][0]["loc"] == ["body", "checks", 0, "kind"]
    assert "'lipschitz' needs the model's gradients or weights" in problem["errors"][0]["msg"]

    # a budget over the tenant's cap
    too_many = Settings().tenant_max_endpoint_queries + 1
    response = client.post(
        "/v1/audits",
        headers=auth,
        json=audit_request(model_id, checks=query_only, budget={"queries": too_many}),
    )
    problem = assert_problem(response, 422, "validation-failed")
    assert problem["errors"][0]["loc"] == ["body", "budget", "queries"]

    # an endpoint is never the model compared with
    uploaded = client.post("/v1/endpoint-models", headers=auth, json=with_(model_name="other"))
    other_id = uploaded.json()["id"]
    set_model_status(client, other_id, "ready")
    response = client.post(
        "/v1/audits",
        headers=auth,
        json=audit_request(model_id, checks=query_only, compare_with={"model_id": other_id}),
    )
    problem = assert_problem(response, 422, "validation-failed")
    assert "compare_with takes an uploaded model" in problem["detail"]

    other = new_key(client)  # another tenant's endpoint model is as unknown as a missing one
    assert client.get(f"/v1/models/{model_id}", headers=other).status_code == 404
