"""API keys: shown once, stored as a hash; every route but health needs one."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db.keys import create_api_key, hash_key, revoke_api_key
from service.db.tables import ApiKey, Tenant
from tests.service.conftest import assert_problem, sessions_of

# The routes under /v1 that need no API key (docs/http-api.md): whoever holds a report can
# check its signature. Every other /v1 route of the app needs one.
PUBLIC = {("GET", "/v1/signing-key"), ("GET", "/v1/signing-key.pem")}


def v1_routes(client: TestClient) -> set[tuple[str, str]]:
    """(method, path template) of every /v1 operation the app serves, from its OpenAPI
    document (the console's cookie-authenticated pages under /ui are not part of the API)."""
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    return {
        (method.upper(), path)
        for path, operations in paths.items()
        if path.startswith("/v1/")
        for method in operations
    }


def concrete(path: str) -> str:
    """A path template with each parameter filled in (`{name}` → `x`, an artifact → `a.png`)."""
    return re.sub(r"\{name\}", "a.png", re.sub(r"\{(?!name\})[^}]+\}", "x", path))


def test_only_the_hash_is_stored(client: TestClient) -> None:
    with sessions_of(client)() as session:
        secret = create_api_key(session, "acme")
        second = create_api_key(session, "acme")
        tenants = session.scalars(select(Tenant).where(Tenant.name == "acme")).all()
        keys = session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenants[0].id)).all()
    assert secret.startswith("tr_") and len(secret) > 40 and secret != second
    assert len(tenants) == 1 and len(keys) == 2
    assert {k.key_hash for k in keys} == {hash_key(secret), hash_key(second)}
    assert all(secret not in (k.key_hash, k.prefix) for k in keys)


def test_every_route_needs_a_key(client: TestClient) -> None:
    routes = v1_routes(client)
    assert routes >= PUBLIC  # the documented exceptions exist
    protected = sorted(routes - PUBLIC)
    assert len(protected) >= 12
    for method, template in protected:
        path = concrete(template)
        for headers in ({}, {"Authorization": "Bearer tr_wrong"}, {"Authorization": "Basic x"}):
            response = client.request(method, path, headers=headers)
            assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")


def test_revoked_key_is_refused(client: TestClient) -> None:
    with sessions_of(client)() as session:
        secret = create_api_key(session, "revoked-co")
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    with sessions_of(client)() as session:
        assert revoke_api_key(session, secret)
        assert not revoke_api_key(session, secret)
    assert_problem(client.get("/v1/models", headers=headers), 401)


def test_health_routes_are_open(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/metrics").status_code == 200
    assert client.get("/readyz").status_code in (200, 503)
