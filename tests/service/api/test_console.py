"""The web console at /ui over HTTP (issue 13): sign-in with an API key into a server-side
session (cookie flags, CSRF, revocation), the tenant's audits with filters and pages, an audit
with its report and signature state, two audits side by side, and another tenant's audit a 404.

Audits are rows written as a worker would leave them, with report.json (and report.html) on
disk: no worker runs here."""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from schemas.canonical import canonical_json
from service.api.app import create_app
from service.api.console.routes import CONSOLE_CSP, EMBEDDED_REPORT_CSP
from service.api.console.sessions import FORM_COOKIE, SESSION_COOKIE
from service.db.keys import create_api_key, revoke_api_key
from service.db.tables import Artifact, Audit, ConsoleSession, Model, Tenant, utcnow
from service.reports import signatures as signing
from service.settings import Settings
from tests.service.conftest import SPEC, sessions_of
from tests.service.reports.sample import make_report

# The helpers below write rows through a TestClient's app or a sessionmaker of their own.
Sessions = TestClient | sessionmaker[Session]


def _factory(source: Sessions) -> sessionmaker[Session]:
    return sessions_of(source) if isinstance(source, TestClient) else source


@dataclass(frozen=True)
class Tenancy:
    name: str
    id: str
    key: str


def new_tenant(client: Sessions, name: str | None = None) -> Tenancy:
    name = name or f"console-{uuid.uuid4().hex[:10]}"
    with _factory(client)() as session:
        key = create_api_key(session, name)
        tenant = session.scalar(select(Tenant).where(Tenant.name == name))
        assert tenant is not None
        return Tenancy(name, tenant.id, key)


def add_model(client: Sessions, tenant: Tenancy, name: str = "tiny-cnn") -> str:
    with _factory(client)() as session:
        model = Model(
            tenant_id=tenant.id,
            name=name,
            spec={**SPEC, "name": name},
            format="torchscript",
            sha256=uuid.uuid4().hex * 2,
            size_bytes=1234,
            status="ready",
        )
        session.add(model)
        session.commit()
        return model.id


def scaled_report(factor: float) -> dict[str, Any]:
    """The sample report with every relative error of every level scaled by `factor`."""
    report = copy.deepcopy(make_report())
    for check in report["checks"]:
        for level in check.get("levels") or []:
            for name in ("relative_error", "gaussian_relative_error"):
                for statistic, value in (level.get(name) or {}).items():
                    level[name][statistic] = value * factor
    return report


def add_audit(
    client: Sessions,
    settings: Settings,
    tenant: Tenancy,
    model_id: str,
    status: str = "succeeded",
    *,
    report: dict[str, Any] | None = None,
    html: str | None = None,
    minutes_ago: float = 0.0,
    **values: Any,
) -> str:
    """An audit row as a worker leaves it; a succeeded one gets `report` (signed with the
    service's key unless it already has a signature) and report.html on disk."""
    with _factory(client)() as session:
        audit = Audit(
            tenant_id=tenant.id,
            model_id=model_id,
            request={"model_id": model_id},
            request_hash="0" * 64,
            status=status,
            created_at=utcnow() - timedelta(minutes=minutes_ago),
            **values,
        )
        session.add(audit)
        session.commit()
        audit_id = audit.id
    if status == "succeeded":
        folder = settings.artifact_dir / audit_id
        folder.mkdir(parents=True)
        body = report if report is not None else make_report()
        if "signature" not in body:
            key = signing.load_or_create_private_key(signing.key_path(settings))
            body = signing.sign_report({**body, "audit_id": audit_id}, key)
        (folder / "report.json").write_text(canonical_json(body))
        (folder / "report.html").write_text(
            html or "<!DOCTYPE html><title>report</title><p id=verdict>fail</p>"
        )
        with _factory(client)() as session:
            row = session.get(Audit, audit_id)
            assert row is not None
            row.report_path = f"{audit_id}/report.json"
            row.verdict = row.verdict or body.get("verdict")
            row.finished_at = utcnow()
            session.commit()
    return audit_id


def form_token(client: TestClient, path: str = "/ui/sign-in") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match is not None
    return match.group(1)


def sign_in(client: TestClient, key: str) -> Any:
    token = form_token(client)
    return client.post(
        "/ui/sign-in", data={"api_key": key, "csrf_token": token}, follow_redirects=False
    )


def signed_in(client: TestClient, tenant: Tenancy) -> TestClient:
    response = sign_in(client, tenant.key)
    assert response.status_code == 303, response.text
    return client


def page_csrf(html: str) -> str:
    match = re.search(r'action="/ui/sign-out">.*?name="csrf_token" value="([^"]+)"', html, re.S)
    assert match is not None
    return match.group(1)


def session_rows(client: TestClient) -> int:
    with sessions_of(client)() as session:
        return int(session.scalar(select(func.count()).select_from(ConsoleSession)) or 0)


def test_sign_in_sets_a_strict_http_only_session_cookie_and_sign_out_ends_it(
    client: TestClient,
) -> None:
    tenant = new_tenant(client)
    away = client.get("/ui/audits?status=running", follow_redirects=False)
    assert away.status_code == 303
    assert away.headers["location"] == "/ui/sign-in?next=%2Fui%2Faudits%3Fstatus%3Drunning"

    wrong = sign_in(client, "tr_" + "x" * 43)
    assert wrong.status_code == 401 and "not valid or has been revoked" in wrong.text
    assert SESSION_COOKIE + "=" not in wrong.headers.get("set-cookie", "")
    assert sign_in(client, "not even a key").status_code == 401

    before = session_rows(client)
    right = sign_in(client, tenant.key)
    assert right.status_code == 303 and right.headers["location"] == "/ui/audits"
    cookies = right.headers.get_list("set-cookie")
    session_cookie = next(c for c in cookies if c.startswith(SESSION_COOKIE + "="))
    flags = {part.strip().lower() for part in session_cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui"} <= flags
    assert "secure" not in flags  # plain HTTP here; see the HTTPS test
    token = session_cookie.split(";")[0].split("=", 1)[1]
    assert tenant.key not in "".join(cookies) and len(token) == 43
    assert session_rows(client) == before + 1
    assert any(c.startswith(FORM_COOKIE + '=""') for c in cookies)  # the form token is spent

    page = client.get("/ui/audits")
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == CONSOLE_CSP
    assert page.headers["cache-control"] == "no-store"
    assert tenant.name in page.text

    refused = client.post("/ui/sign-out", data={"csrf_token": "forged"}, follow_redirects=False)
    assert refused.status_code == 403
    assert client.get("/ui/audits", follow_redirects=False).status_code == 200

    out = client.post(
        "/ui/sign-out", data={"csrf_token": page_csrf(page.text)}, follow_redirects=False
    )
    assert out.status_code == 303 and out.headers["location"] == "/ui/sign-in"
    assert session_rows(client) == before
    # The old cookie, sent again, is nothing any more: the session was deleted server side.
    client.cookies.set(SESSION_COOKIE, token, path="/ui")
    assert client.get("/ui/audits", follow_redirects=False).status_code == 303


def test_sign_in_refuses_forms_from_elsewhere(client: TestClient) -> None:
    tenant = new_tenant(client)
    before = session_rows(client)
    token = form_token(client)
    attempts: list[tuple[dict[str, str], dict[str, str]]] = [
        ({"api_key": tenant.key}, {}),  # no token
        ({"api_key": tenant.key, "csrf_token": "x" * 43}, {}),  # not the cookie's
        ({"api_key": tenant.key, "csrf_token": token}, {"Origin": "http://evil.example"}),
        ({"api_key": tenant.key, "csrf_token": token}, {"Sec-Fetch-Site": "cross-site"}),
        ({"api_key": tenant.key, "csrf_token": "é" * 43}, {}),  # not ASCII: no 500
    ]
    for data, headers in attempts:
        response = client.post("/ui/sign-in", data=data, headers=headers, follow_redirects=False)
        assert response.status_code == 403, (data, headers)
        assert "another site" in response.text
    assert session_rows(client) == before
    # Without the form cookie (a cross-site POST: SameSite=Strict keeps it back) a token alone
    # is not enough either.
    client.cookies.delete(FORM_COOKIE, path="/ui")
    response = client.post(
        "/ui/sign-in",
        data={"api_key": tenant.key, "csrf_token": token},
        follow_redirects=False,
    )
    assert response.status_code == 403
    ok = client.post(
        "/ui/sign-in",
        data={"api_key": tenant.key, "csrf_token": form_token(client)},
        headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
        follow_redirects=False,
    )
    assert ok.status_code == 303


def test_the_cookie_is_secure_over_https(settings: Settings) -> None:
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        tenant = new_tenant(client)
        response = sign_in(client, tenant.key)
        assert response.status_code == 303
        cookie = next(
            c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
        )
        assert "secure" in cookie.lower()


def test_revoking_the_key_ends_its_console_sessions(client: TestClient) -> None:
    tenant = new_tenant(client)
    signed_in(client, tenant)
    assert client.get("/ui/audits", follow_redirects=False).status_code == 200
    with sessions_of(client)() as session:
        assert revoke_api_key(session, tenant.key)
    assert client.get("/ui/audits", follow_redirects=False).status_code == 303
    assert client.get("/ui/progress").status_code == 401
    assert sign_in(client, tenant.key).status_code == 401


def test_a_tenant_never_sees_another_tenants_audit(client: TestClient, settings: Settings) -> None:
    mine, theirs = new_tenant(client), new_tenant(client)
    my_audit = add_audit(client, settings, mine, add_model(client, mine))
    their_model = add_model(client, theirs, name="their-secret-model")
    their_audit = add_audit(client, settings, theirs, their_model)
    signed_in(client, mine)
    listing = client.get("/ui/audits")
    assert my_audit in listing.text and their_audit not in listing.text
    assert "their-secret-model" not in listing.text
    for path in (
        f"/ui/audits/{their_audit}",
        f"/ui/audits/{their_audit}/report.json",
        f"/ui/audits/{their_audit}/report.html",
        f"/ui/audits/{their_audit}/report.junit.xml",
        f"/ui/audits/{their_audit}/artifacts/report.json",
        f"/ui/compare?id={my_audit}&id={their_audit}",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("text/html")
        assert "their-secret-model" not in response.text
    assert client.get(f"/ui/audits?model_id={their_model}").text.count("audit-link") == 0
    live = client.get(f"/ui/progress?id={their_audit}&id={my_audit}").json()
    assert [a["id"] for a in live["audits"]] == [my_audit]


def test_audits_list_filters_pages_and_progress(client: TestClient, settings: Settings) -> None:
    tenant = new_tenant(client)
    first, second = add_model(client, tenant, "first-net"), add_model(client, tenant, "second-net")
    running = add_audit(
        client,
        settings,
        tenant,
        first,
        "running",
        minutes_ago=1,
        progress_fraction=0.42,
        progress_message="worst_case level 2 of 3",
    )
    queued = add_audit(client, settings, tenant, second, "queued", minutes_ago=2)
    done = [
        add_audit(client, settings, tenant, first, minutes_ago=3 + i, verdict="pass")
        for i in range(3)
    ]
    signed_in(client, tenant)

    everything = client.get("/ui/audits").text
    assert all(a in everything for a in (running, queued, *done))
    assert 'data-audit-live="' + running + '"' in everything
    assert 'value="42"' in everything and "worst_case level 2 of 3" in everything
    assert 'data-audit-live="' + done[0] + '"' not in everything

    only_running = client.get("/ui/audits?status=running").text
    assert running in only_running and queued not in only_running and done[0] not in only_running
    second_only = client.get(f"/ui/audits?model_id={second}").text
    assert queued in second_only and running not in second_only

    page = client.get("/ui/audits?page_size=2")
    assert running in page.text and queued in page.text and done[0] not in page.text
    next_link = re.search(r'href="(/ui/audits\?[^"]+)" rel="next"', page.text)
    assert next_link is not None
    following = client.get(next_link.group(1).replace("&amp;", "&")).text
    assert done[0] in following and done[1] in following and running not in following

    for bad in (
        "status=exploded",
        "page_size=0",
        "page_size=x",
        "page_token=%21%21",
        "model_id=" + "m" * 65,
    ):
        response = client.get(f"/ui/audits?{bad}")
        assert response.status_code == 422, bad
        assert response.headers["content-type"].startswith("text/html")

    live = client.get(f"/ui/progress?id={running}&id={queued}")
    assert live.status_code == 200 and live.headers["cache-control"] == "no-store"
    by_id = {a["id"]: a for a in live.json()["audits"]}
    assert by_id[running]["percent"] == 42 and by_id[running]["finished"] is False
    assert by_id[queued]["status"] == "queued"


def test_an_audit_page_with_its_report_links_and_signature(
    client: TestClient, settings: Settings
) -> None:
    tenant = new_tenant(client)
    model_id = add_model(client, tenant, "<b>bold</b>-net")
    audit_id = add_audit(client, settings, tenant, model_id)
    name = "c01-model-worst_case-level1-original.npy"
    (settings.artifact_dir / audit_id / name).write_bytes(b"\x93NUMPY")
    with sessions_of(client)() as session:
        session.add(
            Artifact(
                audit_id=audit_id,
                name=name,
                media_type="application/octet-stream",
                sha256="0" * 64,
                size_bytes=6,
                path=f"{audit_id}/{name}",
            )
        )
        session.commit()
    unsigned = add_audit(
        client, settings, tenant, model_id, report={**make_report(), "signature": None}
    )
    tampered_report = signing.sign_report(
        make_report(), signing.load_or_create_private_key(signing.key_path(settings))
    )
    tampered = add_audit(
        client, settings, tenant, model_id, report={**tampered_report, "verdict": "pass"}
    )
    queued = add_audit(client, settings, tenant, model_id, "queued")
    signed_in(client, tenant)

    page = client.get(f"/ui/audits/{audit_id}")
    assert page.status_code == 200
    assert "&lt;b&gt;bold&lt;/b&gt;-net" in page.text and "<b>bold</b>" not in page.text
    assert "Valid: signed by this service" in page.text and "signature-valid" in page.text
    for link in ("report.json", "report.junit.xml", "report.html", f"artifacts/{name}"):
        assert f'href="/ui/audits/{audit_id}/{link}"' in page.text, link
    assert (
        f'<iframe class="report" id="report-frame" src="/ui/audits/{audit_id}/report.html"'
        in page.text
    )
    assert "worst_case" in page.text  # the findings' sentences

    report = client.get(f"/ui/audits/{audit_id}/report.json")
    assert report.status_code == 200 and report.json()["audit_id"] == audit_id
    junit = client.get(f"/ui/audits/{audit_id}/report.junit.xml")
    assert junit.status_code == 200 and junit.text.startswith("<?xml")
    html = client.get(f"/ui/audits/{audit_id}/report.html")
    assert (
        html.status_code == 200 and html.headers["content-security-policy"] == EMBEDDED_REPORT_CSP
    )
    assert html.headers["x-frame-options"] == "SAMEORIGIN"
    artifact = client.get(f"/ui/audits/{audit_id}/artifacts/{name}")
    assert artifact.status_code == 200 and artifact.content == b"\x93NUMPY"
    assert artifact.headers["content-disposition"].startswith("attachment")
    assert client.get(f"/ui/audits/{audit_id}/artifacts/..%2Fx").status_code == 404
    assert client.get(f"/ui/audits/{audit_id}/artifacts/nothing.npy").status_code == 404

    assert "Not signed" in client.get(f"/ui/audits/{unsigned}").text
    assert "does not verify" in client.get(f"/ui/audits/{tampered}").text
    waiting = client.get(f"/ui/audits/{queued}")
    assert waiting.status_code == 200 and f'data-audit-live="{queued}"' in waiting.text
    assert client.get(f"/ui/audits/{queued}/report.json").status_code == 409
    assert client.get(f"/ui/audits/{queued}/report.junit.xml").status_code == 409
    assert client.get("/ui/audits/aud_missing").status_code == 404


def _series_points(html: str, audit: str) -> list[list[tuple[float, float]]]:
    found = re.findall(rf'class="series series-{audit}" points="([^"]+)"', html)
    return [[tuple(map(float, p.split(","))) for p in points.split()] for points in found]  # type: ignore[misc]


def test_two_audits_side_by_side_share_their_axes(client: TestClient, settings: Settings) -> None:
    tenant = new_tenant(client)
    model_id = add_model(client, tenant)
    a = add_audit(client, settings, tenant, model_id, report=scaled_report(1.0))
    b = add_audit(client, settings, tenant, model_id, report=scaled_report(0.5))
    running = add_audit(client, settings, tenant, model_id, "running")
    signed_in(client, tenant)

    page = client.get(f"/ui/compare?id={a}&id={b}")
    assert page.status_code == 200
    assert page.text.index(a) < page.text.index(b)
    # worst_case and random_noise each: one chart, both audits on it
    assert page.text.count('<svg role="img"') == 2
    a_series, b_series = _series_points(page.text, "A"), _series_points(page.text, "B")
    assert len(a_series) == 3 and len(b_series) == 3  # worst case; noise: model and baseline
    # Shared axes: B's errors are half of A's, so on the worst-case chart (the first) B's points
    # sit at the same x and lower (a larger SVG y) than A's.
    worst_a, worst_b = a_series[0], b_series[0]
    assert [x for x, _ in worst_a] == [x for x, _ in worst_b]
    assert all(yb > ya for (_, ya), (_, yb) in zip(worst_a, worst_b, strict=True))
    assert "<td>0.9</td>" in page.text and "<td>0.45</td>" in page.text  # the numbers table

    without_report = client.get(f"/ui/compare?id={a}&id={running}")
    assert without_report.status_code == 200 and "the audit is running" in without_report.text
    for query in (f"id={a}", f"id={a}&id={a}", "", f"id={a}&id={b}&id={running}"):
        assert client.get(f"/ui/compare?{query}").status_code == 422, query


def test_models_and_datasets_pages(client: TestClient, settings: Settings) -> None:
    tenant = new_tenant(client)
    add_model(client, tenant, "<script>alert(1)</script>")
    signed_in(client, tenant)
    models = client.get("/ui/models")
    assert models.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in models.text
    assert "<script>alert" not in models.text
    assert "model-stochastic" not in models.text  # a model with no probe facts: no badge
    sampler = add_model(client, tenant, "sampler")
    with _factory(client)() as session:
        row = session.get(Model, sampler)
        assert row is not None
        row.admission_info = {"probe": "passed", "stochastic": True, "output_spread": 0.1224}
        session.commit()
    badge = client.get("/ui/models").text
    assert badge.count('class="badge model-stochastic"') == 1 and "differ by 0.122" in badge
    datasets = client.get("/ui/datasets")
    assert datasets.status_code == 200 and "No datasets uploaded" in datasets.text
    assert client.get("/ui/models?page_token=nonsense").status_code == 422


def test_pages_load_nothing_from_elsewhere_and_run_no_inline_code(
    client: TestClient, settings: Settings
) -> None:
    tenant = new_tenant(client)
    model_id = add_model(client, tenant)
    a = add_audit(client, settings, tenant, model_id)
    b = add_audit(client, settings, tenant, model_id, "running")
    signed_in(client, tenant)
    for path in (
        "/ui/audits",
        f"/ui/audits/{a}",
        f"/ui/audits/{b}",
        f"/ui/compare?id={a}&id={b}",
        "/ui/models",
        "/ui/datasets",
    ):
        html = client.get(path).text
        assert re.findall(r"<script[^>]*>", html) == ['<script src="/ui/static/console.js" defer>']
        assert " style=" not in html and "<style" not in html and " on" + "click" not in html
        assert not re.search(r'(src|href|action)="(https?:)?//', html), path
    script = client.get("/ui/static/console.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith(
        "text/javascript"
    )
    assert client.get("/ui/static/console.css").headers["content-type"].startswith("text/css")
    assert client.get("/ui/static/..%2Fsessions.py").status_code == 404
    assert client.get("/ui/static/routes.py").status_code == 404


def test_the_console_is_not_in_the_openapi_description(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert paths and not [p for p in paths if p.startswith("/ui")]
    assert json.dumps(paths).count("/v1/audits") > 0


def test_a_sign_in_body_that_is_not_a_form_is_refused_not_a_500(client: TestClient) -> None:
    response = client.post("/ui/sign-in", json={"api_key": "tr_x"}, follow_redirects=False)
    assert response.status_code == 403
    response = client.post(
        "/ui/sign-in",
        content=b"\xff\xfe" * 10,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert response.status_code in (400, 403)
