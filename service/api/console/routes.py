"""`/ui`: the web console (docs/console.md). Server-rendered pages for people: sign in with an API
key, the tenant's audits (status, verdict, model, progress, filters, pages), an audit with its
report, two audits side by side, models and datasets.

Every page reads through the same tenant-scoped rules as the API (service/domain/:
`list_page`, `get_owned_audit`, ...), never through a route module: another tenant's audit is a
404 here as there. The routes that need a signed-in user (or the user's audit) take it as a
dependency (`SignedIn`, `OwnedAudit`); without one the dependency answers (the sign-in redirect,
an error page) and the route never runs. Pages are HTML (Jinja2,
autoescape on) under a CSP that allows only this origin's stylesheet and script, no inline
code and no request elsewhere; the embedded report keeps the report's own CSP. None of these
routes is in the OpenAPI description.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, get_args
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.audits import TERMINAL_STATES, AuditState, AuditStatus
from service.api.audit_views import check_progress, to_status
from service.api.console import sessions
from service.api.console.charts import compare_charts
from service.api.console.sessions import ConsoleUser
from service.api.deps import ArtifactsDep, SessionDep, public_key_of
from service.api.http_headers import REPORT_HTML_CSP, report_response, security_headers
from service.api.stored_files import StoredObjectResponse
from service.db.tables import Artifact, Audit, Model
from service.domain import audit_rules as rules
from service.domain.errors import TightropeError
from service.domain.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from service.domain.resource_rules import dataset_page, model_page
from service.reports import signatures as signing
from service.reports.findings import findings, fmt
from service.reports.junit import MEDIA_TYPE as JUNIT_MEDIA_TYPE
from service.reports.junit import render_junit
from service.storage.objects import StorageError
from service.storage.stores import ArtifactStore


class Answered(Exception):
    """A dependency's answer in place of the route's: the sign-in redirect, an error page."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class ConsoleRoute(APIRoute):
    """A console route: sends the answer a dependency raised (`Answered`) as its own."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Answered as answered:
                return answered.response

        return answer


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=ConsoleRoute)

HERE = Path(__file__).resolve().parent
STATIC_FILES = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}
# Pages: this origin's stylesheet, script, fetches and frames only; nothing inline.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
# The embedded report: the report's own policy (no script, no request), framed by us only.
EMBEDDED_REPORT_CSP = f"{REPORT_HTML_CSP}; frame-ancestors 'self'"
PAGE_HEADERS = {
    "Content-Security-Policy": CONSOLE_CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATES: tuple[str, ...] = get_args(AuditState)
MAX_ID_LENGTH = 64
MAX_LIVE_IDS = 100
MAX_FILTER_MODELS = 100
MAX_COMPARE_CHOICES = 50
_NEXT = re.compile(r"^/ui/[A-Za-z0-9_\-/.?=&%]*$")


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["fmt"] = fmt
    env.filters["percent"] = lambda fraction: f"{round(100 * float(fraction))} %"
    return env


TEMPLATES = _environment()


def _page(
    template: str,
    user: ConsoleUser | None,
    status_code: int = 200,
    nav: str = "",
    **context: Any,
) -> HTMLResponse:
    html = TEMPLATES.get_template(template).render(user=user, nav=nav, **context)
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


def _error(user: ConsoleUser | None, status_code: int, message: str) -> HTMLResponse:
    titles = {403: "Refused", 404: "Not found", 409: "Not ready", 422: "Not valid"}
    title = titles.get(status_code, "Error")
    return _page("error.html.j2", user, status_code, title=title, message=message)


def _problem_page(user: ConsoleUser, exc: TightropeError) -> HTMLResponse:
    return _error(user, exc.status, exc.detail)


def _to_sign_in(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    query = f"?next={quote(target, safe='')}" if _NEXT.match(target) else ""
    return RedirectResponse(f"/ui/sign-in{query}", status_code=303, headers=PAGE_HEADERS)


def signed_in(request: Request, session: SessionDep) -> ConsoleUser:
    """The signed-in user; without one, the route answers with the sign-in page's redirect."""
    user = sessions.current_user(session, request)
    if user is None:
        raise Answered(_to_sign_in(request))
    return user


SignedIn = Annotated[ConsoleUser, Depends(signed_in)]


def _own(session: Session, user: ConsoleUser, audit_id: str) -> Audit:
    """The user's audit; another tenant's (or none) is the API's 404, as an error page."""
    try:
        return rules.get_owned_audit(session, user.tenant, audit_id)
    except TightropeError as exc:
        raise Answered(_problem_page(user, exc)) from None


def owned_audit(audit_id: str, user: SignedIn, session: SessionDep) -> Audit:
    """The signed-in user's audit of the path's `audit_id`."""
    return _own(session, user, audit_id)


OwnedAudit = Annotated[Audit, Depends(owned_audit)]


def _safe_next(value: str | None) -> str:
    if value and _NEXT.match(value) and "//" not in value and value != "/ui/sign-in":
        return value
    return "/ui/audits"


def _page_size(value: str | None) -> int | None:
    if value is None or value == "":
        return DEFAULT_PAGE_SIZE
    if not value.isdigit() or not 1 <= int(value) <= MAX_PAGE_SIZE:
        return None
    return int(value)


# Sign-in and sign-out


@router.get("", response_class=RedirectResponse)
def console_root() -> RedirectResponse:
    return RedirectResponse("/ui/audits", status_code=303)


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_page(request: Request, session: SessionDep, next: str | None = None) -> Response:
    if sessions.current_user(session, request) is not None:
        return RedirectResponse(_safe_next(next), status_code=303, headers=PAGE_HEADERS)
    return _sign_in_form(request, next=_safe_next(next))


def _sign_in_form(
    request: Request, next: str, error: str | None = None, status_code: int = 200
) -> HTMLResponse:
    token = sessions.form_token(request)
    response = _page(
        "sign_in.html.j2",
        None,
        status_code,
        title="Sign in",
        error=error,
        next=next,
        csrf_token=token,
    )
    sessions.set_form_cookie(response, request, token)
    return response


@router.post("/sign-in", response_class=HTMLResponse)
def sign_in(
    request: Request,
    session: SessionDep,
    api_key: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
) -> Response:
    if not sessions.same_origin(request) or not sessions.form_token_valid(request, csrf_token):
        return _sign_in_form(
            request,
            _safe_next(next),
            "The form expired or came from another site. Sign in again from this page.",
            403,
        )
    token = sessions.sign_in(session, api_key)
    if token is None:
        return _sign_in_form(
            request, _safe_next(next), "That API key is not valid or has been revoked.", 401
        )
    response = RedirectResponse(_safe_next(next), status_code=303, headers=PAGE_HEADERS)
    sessions.set_session_cookie(response, request, token)
    sessions.clear_cookie(response, request, sessions.FORM_COOKIE)
    return response


@router.post("/sign-out", response_class=HTMLResponse)
def sign_out(
    request: Request, session: SessionDep, csrf_token: Annotated[str, Form()] = ""
) -> Response:
    user = sessions.current_user(session, request)
    if user is not None:
        if not sessions.same_origin(request) or not sessions.session_csrf_valid(user, csrf_token):
            return _error(user, 403, "The sign-out form expired or came from another site.")
        sessions.sign_out(session, user)
    response = RedirectResponse("/ui/sign-in", status_code=303, headers=PAGE_HEADERS)
    sessions.clear_cookie(response, request, sessions.SESSION_COOKIE)
    return response


# Audits


def _model_names(session: Session, user: ConsoleUser, ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    rows = session.execute(
        select(Model.id, Model.name).where(Model.tenant_id == user.tenant.id, Model.id.in_(ids))
    )
    return {model_id: name for model_id, name in rows}


@router.get("/audits", response_class=HTMLResponse)
def audits_page(
    session: SessionDep,
    user: SignedIn,
    status: str | None = None,
    model_id: str | None = None,
    page_token: str | None = None,
    page_size: str | None = None,
) -> Response:
    size = _page_size(page_size)
    if status and status not in STATES:
        return _error(user, 422, f"Unknown status {status!r}; choose one of the list.")
    if size is None:
        return _error(user, 422, f"page_size must be a whole number from 1 to {MAX_PAGE_SIZE}.")
    if model_id and len(model_id) > MAX_ID_LENGTH:
        return _error(user, 422, "That is not a model id.")
    try:
        listed = rules.list_page(
            session,
            user.tenant,
            status=status or None,  # checked against STATES above
            model_id=model_id or None,
            page_size=size,
            page_token=page_token or None,
        )
    except TightropeError as exc:
        return _problem_page(user, exc)
    models = model_page(session, user.tenant, page_size=MAX_FILTER_MODELS, page_token=None)
    names = {m.id: m.name for m in models.items}
    names.update(_model_names(session, user, {a.model_id for a in listed.items} - set(names)))
    filters = {"status": status or "", "model_id": model_id or ""}
    if page_size:
        filters["page_size"] = str(size)
    query = {name: value for name, value in filters.items() if value}
    return _page(
        "audits.html.j2",
        user,
        nav="audits",
        title="Audits",
        audits=listed.items,
        next_page_token=listed.next_page_token,
        names=names,
        models=models.items,
        states=STATES,
        filters=filters,
        query=query,
        first_page=not page_token,
        terminal=TERMINAL_STATES,
    )


def _live(audit: AuditStatus) -> dict[str, Any]:
    return {
        "id": audit.id,
        "status": audit.status,
        "verdict": audit.verdict,
        "fraction": audit.progress.fraction,
        "percent": round(100 * audit.progress.fraction),
        "message": audit.progress.message or audit.progress.current_check or "",
        "finished": audit.status in TERMINAL_STATES,
    }


@router.get("/progress", response_class=JSONResponse)
def progress(
    request: Request, session: SessionDep, id: Annotated[list[str] | None, Query()] = None
) -> Response:
    """The status of some of the tenant's audits, for the pages' progress refresh (static/
    console.js): ids that are not the tenant's are left out."""
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    user = sessions.current_user(session, request)
    if user is None:
        return JSONResponse({"signed_in": False}, status_code=401, headers=headers)
    ids = [i for i in (id or []) if 0 < len(i) <= MAX_ID_LENGTH][:MAX_LIVE_IDS]
    rows: list[Audit] = []
    if ids:
        rows = list(
            session.scalars(
                select(Audit).where(Audit.tenant_id == user.tenant.id, Audit.id.in_(ids))
            )
        )
    return JSONResponse(
        {"signed_in": True, "audits": [_live(to_status(a)) for a in rows]}, headers=headers
    )


def _read_report(audit: Audit, artifacts: ArtifactStore) -> dict[str, Any] | None:
    if audit.status != "succeeded" or not audit.report_path:
        return None
    try:
        key, info = rules.report_file(audit, artifacts, "report")
        report = json.loads(artifacts.read_bytes(key, info.sha256).decode("utf-8"))
    except (TightropeError, OSError, ValueError, StorageError):
        return None
    return report if isinstance(report, dict) else None


def _signature_state(request: Request, report: dict[str, Any]) -> tuple[str, str]:
    """(state, words): `valid`, `invalid` or `unsigned`, for this service's signing key."""
    if not isinstance(report.get(signing.SIGNATURE_FIELD), dict):
        return "unsigned", "Not signed"
    public_key = public_key_of(request)
    if signing.verify(report, public_key):
        return (
            "valid",
            f"Valid: signed by this service (Ed25519 key {signing.key_id(public_key)[:12]}…)",
        )
    return "invalid", "The signature does not verify with this service's key"


@router.get("/audits/{audit_id}", response_class=HTMLResponse)
def audit_page(
    request: Request,
    session: SessionDep,
    stored: ArtifactsDep,
    user: SignedIn,
    audit: OwnedAudit,
) -> Response:
    checks = check_progress(session, audit.id) if audit.shards_total > 0 else None
    view = to_status(audit, checks)
    model = session.get(Model, audit.model_id)
    report = _read_report(audit, stored)
    has_html = report is not None and _has_report_html(audit, stored)
    artifacts = session.scalars(
        select(Artifact.name).where(Artifact.audit_id == audit.id).order_by(Artifact.name)
    ).all()
    others = session.execute(
        select(Audit.id, Audit.created_at, Audit.model_id)
        .where(Audit.tenant_id == user.tenant.id, Audit.id != audit.id)
        .order_by(Audit.created_at.desc(), Audit.id.desc())
        .limit(MAX_COMPARE_CHOICES)
    ).all()
    names = _model_names(session, user, {audit.model_id, *(o.model_id for o in others)})
    return _page(
        "audit.html.j2",
        user,
        nav="audits",
        title=f"Audit {audit.id}",
        audit=view,
        model_name=model.name if model is not None else audit.model_id,
        report=report,
        findings=findings(report) if report is not None else [],
        signature=_signature_state(request, report) if report is not None else None,
        has_html=has_html,
        artifacts=artifacts,
        others=others,
        names=names,
        terminal=TERMINAL_STATES,
        live=_live(view),
    )


def _has_report_html(audit: Audit, artifacts: ArtifactStore) -> bool:
    try:
        rules.report_file(audit, artifacts, "report.html")
    except TightropeError:
        return False
    return True


def _report_download(
    user: ConsoleUser, audit: Audit, artifacts: ArtifactStore, name: str
) -> Response:
    try:
        file = report_response(artifacts, rules.report_file(audit, artifacts, name), name)
    except TightropeError as exc:
        return _problem_page(user, exc)
    file.headers["X-Content-Type-Options"] = "nosniff"
    if name == "report.html":
        file.headers["Content-Security-Policy"] = EMBEDDED_REPORT_CSP
        file.headers["X-Frame-Options"] = "SAMEORIGIN"
    return file


@router.get("/audits/{audit_id}/report.json")
def report_json(artifacts: ArtifactsDep, user: SignedIn, audit: OwnedAudit) -> Response:
    return _report_download(user, audit, artifacts, "report")


@router.get("/audits/{audit_id}/report.html")
def report_html(artifacts: ArtifactsDep, user: SignedIn, audit: OwnedAudit) -> Response:
    return _report_download(user, audit, artifacts, "report.html")


@router.get("/audits/{audit_id}/report.junit.xml")
def report_junit(
    audit_id: str, artifacts: ArtifactsDep, user: SignedIn, audit: OwnedAudit
) -> Response:
    if audit.status != "succeeded":
        return _error(user, 409, f"Audit {audit_id!r} is {audit.status}; no report yet.")
    report = _read_report(audit, artifacts)
    if report is None:
        return _error(user, 404, f"Audit {audit_id!r} has no readable report.")
    return Response(
        render_junit(report),
        media_type=JUNIT_MEDIA_TYPE,
        headers={
            "X-Content-Type-Options": "nosniff",
            "Content-Disposition": f'attachment; filename="{audit.id}.junit.xml"',
        },
    )


@router.get("/audits/{audit_id}/artifacts/{name}")
def artifact(
    audit_id: str,
    name: str,
    session: SessionDep,
    artifacts: ArtifactsDep,
    user: SignedIn,
    audit: OwnedAudit,
) -> Response:
    try:
        row, info = rules.artifact_file(session, audit, artifacts, name)
    except TightropeError:
        return _error(user, 404, f"Audit {audit_id!r} has no artifact {name!r}.")
    headers = {**(security_headers(row.media_type) or {}), "X-Content-Type-Options": "nosniff"}
    # Always a download: an artifact is never rendered as a page of this origin.
    local = artifacts.local_path(row.path)
    if local is None:
        return StoredObjectResponse(
            artifacts.objects, info, media_type=row.media_type, filename=name, headers=headers
        )
    return FileResponse(local, media_type=row.media_type, filename=name, headers=headers)


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    session: SessionDep,
    artifacts: ArtifactsDep,
    user: SignedIn,
    id: Annotated[list[str] | None, Query()] = None,
) -> Response:
    ids = [i for i in (id or []) if i]
    if len(ids) != 2 or ids[0] == ids[1]:
        return _error(user, 422, "Choose exactly two different audits to compare.")
    audits = [_own(session, user, audit_id) for audit_id in ids]
    reports = {
        label: _read_report(a, artifacts) for label, a in zip(("A", "B"), audits, strict=True)
    }
    names = _model_names(session, user, {a.model_id for a in audits})
    columns = []
    for label, audit in zip(("A", "B"), audits, strict=True):
        report = reports[label]
        columns.append(
            {
                "label": label,
                "audit": to_status(audit),
                "model": names.get(audit.model_id, audit.model_id),
                "report": report,
                "findings": findings(report) if report is not None else [],
                "signature": _signature_state(request, report) if report is not None else None,
            }
        )
    return _page(
        "compare.html.j2",
        user,
        nav="audits",
        title="Compare audits",
        columns=columns,
        charts=compare_charts(reports),
    )


# Models and datasets


@router.get("/models", response_class=HTMLResponse)
def models_page(session: SessionDep, user: SignedIn, page_token: str | None = None) -> Response:
    return _listing_page(session, user, page_token, model_page, "models", "Models")


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(session: SessionDep, user: SignedIn, page_token: str | None = None) -> Response:
    return _listing_page(session, user, page_token, dataset_page, "datasets", "Datasets")


def _listing_page(
    session: Session,
    user: ConsoleUser,
    page_token: str | None,
    list_items: Callable[..., Any],
    nav: str,
    title: str,
) -> Response:
    """One page of the tenant's models or datasets, through the API's own scoped listing;
    `nav` names the template (`<nav>.html.j2`) and the list it receives."""
    try:
        listed = list_items(
            session, user.tenant, page_size=DEFAULT_PAGE_SIZE, page_token=page_token or None
        )
    except TightropeError as exc:
        return _problem_page(user, exc)
    return _page(
        f"{nav}.html.j2",
        user,
        nav=nav,
        title=title,
        next_page_token=listed.next_page_token,
        first_page=not page_token,
        **{nav: listed.items},
    )


@router.get("/static/{name}")
def static(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        return Response("Not found", status_code=404, media_type="text/plain")
    return FileResponse(
        HERE / "static" / name,
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
