"""`/v1/audits`: submit (202, committed before it is enqueued), poll with ETags, list, cancel,
and fetch the report and artifacts once done.

The routes only speak HTTP: they parse the request, call the audit's rules
(service/domain/audit_rules.py: submission, ownership, quotas, cancel, report and artifact files)
and shape the answer. An `Idempotency-Key` replay answers 202 with the original audit and the
header `Idempotent-Replayed: true`.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from schemas.audits import AuditList, AuditRequest, AuditState, AuditStatus
from schemas.reports import Report
from service.api.audit_views import check_progress, if_none_match_hits, status_etag, to_status
from service.api.deps import (
    ArtifactsDep,
    DispatcherDep,
    PageTokenQuery,
    SessionDep,
    SettingsDep,
    TenantDep,
    TenantLookupDep,
    run_in_slot,
)
from service.api.http_headers import REPORT_HTML_CSP, report_response, security_headers
from service.api.poll_cache import (
    AuditListCache,
    CachedPoll,
    PollCache,
    list_cache_key,
    list_response,
    poll_response,
)
from service.api.problems import problem_responses, response_header, retry_after_header
from service.api.stored_files import stored_response
from service.db.stored_request import stored_callback_url
from service.db.tables import Audit, Tenant
from service.domain import audit_rules as rules
from service.domain.audit_rules import RETRY_AFTER_SECONDS, STATUS_ONLY, get_owned_audit, list_page
from service.domain.errors import NotFound
from service.domain.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from service.reports.junit import MEDIA_TYPE as JUNIT_MEDIA_TYPE
from service.reports.junit import render_junit
from service.storage.objects import ObjectCorrupt, ObjectMissing

log = logging.getLogger(__name__)

# With TIGHTROPE_STORAGE_PRESIGN_SECONDS on a bucket (docs/deployment.md, "Object storage")
PRESIGNED_REDIRECT: dict[int | str, dict[str, Any]] = {
    307: {
        "description": "Only when the deployment presigns downloads: the file itself, at a "
        "short-lived presigned URL of the object store",
        "headers": {"Location": response_header("The presigned URL")},
    }
}

router = APIRouter(prefix="/v1/audits", tags=["audits"])


# OpenAPI only: the response classes below name the media type a route sends (the routes build
# their own responses, so these classes never answer a request themselves).
class XMLResponse(Response):
    media_type = JUNIT_MEDIA_TYPE


class BinaryResponse(Response):
    media_type = "application/octet-stream"


BINARY_SCHEMA = {"type": "string", "format": "binary"}
TEXT_SCHEMA = {"type": "string"}
CSP_HEADER = response_header(f"`{REPORT_HTML_CSP}`: no script, no request")
# What a succeeded audit's artifacts are sent as: the media type the worker recorded from the
# file's name (workers/execution/job_dirs.py, `mimetypes`), application/octet-stream when it knows
# none (.npy).
ARTIFACT_CONTENT = {
    "application/octet-stream": {"schema": BINARY_SCHEMA},
    "image/png": {"schema": BINARY_SCHEMA},
    "*/*": {"schema": BINARY_SCHEMA},
}
REPORT_RETRY_AFTER = {
    409: {
        "Retry-After": retry_after_header(
            "Seconds to wait before polling again; only while the audit is queued or running",
            required=False,
        )
    }
}


# Requests for POST /v1/audits, shown in the OpenAPI description (test_openapi validates them).
AUDIT_REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "reconstruction": {
        "summary": "An MRI reconstruction model: worst case and Lipschitz bound",
        "value": {
            "model_id": "mdl_0123456789abcdef0123456789abcdef",
            "dataset": {"builtin": "shepp_logan", "count": 4, "size": 64},
            "operator": {"kind": "mri", "acceleration": 4},
            "checks": [
                {"kind": "worst_case", "levels": [0.01, 0.02, 0.05]},
                {"kind": "lipschitz", "iterations": 20},
            ],
        },
    },
    "classifier": {
        "summary": "A digit classifier: robust accuracy under ℓ∞ attacks",
        "value": {
            "model_id": "mdl_0123456789abcdef0123456789abcdef",
            "dataset": {"builtin": "digits", "count": 8, "size": 28},
            "checks": [{"kind": "adversarial", "norm": "linf", "epsilons": [0.01, 0.03]}],
        },
    },
}


def _accepted(audit: Audit, replayed: bool = False) -> Response:
    status = to_status(audit)
    headers = {"Location": status.links.self, "Retry-After": RETRY_AFTER_SECONDS}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        status.model_dump_json(), status_code=202, media_type="application/json", headers=headers
    )


@router.post(
    "",
    status_code=202,
    response_model=AuditStatus,
    # 400: a body that cannot be read into values (an over-long number, too deep nesting);
    # 413: a body over max_json_body_bytes (service.api.body_limits);
    # 429: tenant_max_queued_audits of the tenant's audits are already queued
    responses={
        202: {
            "description": "Accepted (stored, then enqueued), or the audit an Idempotency-Key "
            "replay names",
            "headers": {
                "Location": response_header("The audit to poll: /v1/audits/{id}"),
                "Retry-After": retry_after_header("Seconds to wait before the first poll"),
                "Idempotent-Replayed": response_header(
                    "`true` when this answers an Idempotency-Key replay (no new audit)",
                    required=False,
                    schema={"type": "string", "enum": ["true"]},
                ),
            },
        },
        **problem_responses(
            400,
            401,
            409,
            413,
            422,
            429,
            503,
            headers={
                409: {
                    "Retry-After": retry_after_header(
                        "Seconds to wait; only while the model is still `validating`",
                        required=False,
                    )
                }
            },
        ),
    },
    summary="Submit an audit",
)
def submit_audit(
    request: Request,
    body: Annotated[AuditRequest, Body(openapi_examples=AUDIT_REQUEST_EXAMPLES)],
    tenant: TenantDep,
    session: SessionDep,
    dispatcher: DispatcherDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="Per tenant: a replay with the same body answers with the original "
            "audit (`Idempotent-Replayed: true`); with another body it is a 422 "
            "`idempotency-key-reused`",
        ),
    ] = None,
) -> Response:
    submitted = rules.submit(session, settings, tenant, body, idempotency_key)
    if submitted.replayed:
        return _accepted(submitted.audit, replayed=True)
    audit = submitted.audit
    # Only now, with the row safe: a lost message is re-sent by the reconciler.
    dispatcher.audit(audit.id, audit.queue, audit.priority)
    request.app.state.audit_list_cache.forget_tenant(tenant.id)  # its next list shows the audit
    return _accepted(audit)


@router.get(
    "",
    response_model=AuditList,
    responses={
        200: {"description": "A page of the tenant's audits, newest first"},
        **problem_responses(401, 422, 503),
    },
    summary="List audits, newest first",
)
async def list_audits(
    request: Request,
    tenant: TenantLookupDep,
    status: AuditState | None = None,
    model_id: Annotated[
        str | None,
        # No id holds a NUL (PostgreSQL text cannot): say so, rather than a 400 from the query.
        Query(pattern="^[^\\x00]*$", description="Only the audits of this model"),
    ] = None,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    page_token: PageTokenQuery = None,
) -> Response:
    # Dashboards poll the list too: within poll_cache_seconds a page is answered from this
    # process's last answer (service/api/poll_cache.py), without a slot or a query.
    cache: AuditListCache = request.app.state.audit_list_cache
    key = list_cache_key(request.scope["query_string"])
    body = None if key is None else cache.get(tenant.id, key)
    if body is None:
        token = cache.token()  # before the read: a change announced meanwhile keeps nothing
        page = await run_in_slot(
            request, list_page, tenant, status, model_id, page_size, page_token
        )
        body = page.model_dump_json().encode()
        if key is not None:
            cache.put(tenant.id, key, body, token)
    return list_response(body)


POLL_HEADERS = {
    "ETag": response_header("Strong validator of the status body; send it as If-None-Match"),
    "Cache-Control": response_header("`no-cache`: revalidate (If-None-Match) before reuse"),
}


@router.get(
    "/{audit_id}",
    response_model=AuditStatus,
    responses={
        200: {"description": "The audit's status", "headers": POLL_HEADERS},
        304: {
            "description": "Not modified: the ETag matches If-None-Match (no body)",
            "headers": POLL_HEADERS,
        },
        **problem_responses(401, 404, 503),
    },
    summary="Poll an audit (ETag / If-None-Match)",
)
async def read_audit(
    request: Request,
    audit_id: str,
    tenant: TenantLookupDep,
    if_none_match: Annotated[
        str | None,
        Header(description="ETags of earlier answers (or `*`): a match is a 304 without body"),
    ] = None,
) -> Response:
    # The path every CI gate polls: within poll_cache_seconds it is answered on the event loop
    # from this process's last answer (service/api/poll_cache.py), without a slot or a query.
    cache: PollCache = request.app.state.poll_cache
    cached = cache.get(tenant.id, audit_id)
    response = None if cached is None else poll_response(cached, if_none_match)
    if response is None:
        cached = await run_in_slot(request, _answer_poll, tenant, audit_id, if_none_match, cache)
        response = poll_response(cached, if_none_match)
    assert response is not None  # _answer_poll builds the body whenever the tag does not match
    return response


def _answer_poll(
    session: Session, tenant: Tenant, audit_id: str, if_none_match: str | None, cache: PollCache
) -> CachedPoll:
    token = cache.token()  # before the read: a change announced meanwhile keeps nothing
    audit = get_owned_audit(session, tenant, audit_id, options=(STATUS_ONLY,))
    # The tag comes from the columns, so a 304 (the usual answer to a poll) builds no body.
    etag = status_etag(audit)
    body: bytes | None = None
    if not if_none_match_hits(if_none_match, etag):
        # Per-check progress only for a planned audit: one grouped query, and only for a body.
        checks = check_progress(session, audit.id) if audit.shards_total > 0 else None
        body = to_status(audit, checks).model_dump_json().encode()
    return cache.put(tenant.id, audit_id, etag, body, token)


@router.post(
    "/{audit_id}/cancel",
    status_code=202,
    response_model=AuditStatus,
    responses=problem_responses(401, 404, 409, 503),
    summary="Cancel an audit (a running one stops at its next checkpoint)",
)
def cancel_audit(
    request: Request,
    audit_id: str,
    tenant: TenantDep,
    session: SessionDep,
    dispatcher: DispatcherDep,
) -> AuditStatus:
    audit, ended_here = rules.cancel(session, tenant, audit_id)
    # The canceller's next poll must see the cancel (read your own writes), not a cached answer.
    request.app.state.poll_cache.forget(audit_id)
    request.app.state.audit_list_cache.forget_tenant(tenant.id)
    session.refresh(audit)
    if ended_here and stored_callback_url(audit.request, audit_id=audit.id):
        # No worker will touch this audit again: announce it from here (after the commit).
        dispatcher.callback(audit.id)
    return to_status(audit)


@router.get(
    "/{audit_id}/report",
    # The route sends the stored report.json as it is (a FileResponse, so FastAPI does not
    # serialise it through this model); the worker validated it against Report before writing.
    response_model=Report,
    responses={
        200: {"description": "The JSON report (signed; docs/reports.md)"},
        **PRESIGNED_REDIRECT,
        **problem_responses(401, 404, 409, 503, headers=REPORT_RETRY_AFTER),
    },
    summary="The JSON report of a succeeded audit",
)
def read_report(
    audit_id: str, tenant: TenantDep, session: SessionDep, artifacts: ArtifactsDep
) -> Response:
    audit = get_owned_audit(session, tenant, audit_id)
    found = rules.report_file(audit, artifacts, "report")
    return report_response(artifacts, found, "report", presign=True)


@router.get(
    "/{audit_id}/report.html",
    response_class=HTMLResponse,
    responses={
        200: {
            "description": "The self-contained HTML report",
            "content": {"text/html": {"schema": TEXT_SCHEMA}},
            "headers": {"Content-Security-Policy": CSP_HEADER},
        },
        **problem_responses(401, 404, 409, 503, headers=REPORT_RETRY_AFTER),
    },
    summary="The HTML report of a succeeded audit",
)
def read_report_html(
    audit_id: str, tenant: TenantDep, session: SessionDep, artifacts: ArtifactsDep
) -> Response:
    audit = get_owned_audit(session, tenant, audit_id)
    found = rules.report_file(audit, artifacts, "report.html")
    return report_response(artifacts, found, "report.html")


@router.get(
    "/{audit_id}/report.junit.xml",
    response_class=XMLResponse,
    responses={
        200: {
            "description": "JUnit XML, one case per check",
            "content": {JUNIT_MEDIA_TYPE: {"schema": TEXT_SCHEMA}},
        },
        **problem_responses(401, 404, 409, 503, headers=REPORT_RETRY_AFTER),
    },
    summary="The report as JUnit XML, for CI systems",
)
def read_report_junit(
    audit_id: str, tenant: TenantDep, session: SessionDep, artifacts: ArtifactsDep
) -> Response:
    audit = get_owned_audit(session, tenant, audit_id)
    key, info = rules.report_file(audit, artifacts, "report")
    try:
        report = json.loads(artifacts.read_bytes(key, info.sha256).decode("utf-8"))
    except (OSError, ValueError, ObjectMissing, ObjectCorrupt) as exc:
        log.error("audit %s: unreadable report: %s", audit_id, exc)
        raise NotFound(f"Audit {audit_id!r} has no readable report.") from None
    return Response(render_junit(report), media_type=JUNIT_MEDIA_TYPE)


@router.get(
    "/{audit_id}/artifacts/{name}",
    response_class=BinaryResponse,
    responses={
        200: {
            "description": "The artifact, as bytes. Its Content-Type is the one recorded for "
            "the file from its name: image/png for figures, application/octet-stream for "
            "`.npy` arrays and any name without a known type, another type for another "
            "extension (hence */*)",
            "content": ARTIFACT_CONTENT,
            "headers": {
                "Content-Disposition": response_header('`attachment; filename="<name>"`'),
                "Content-Security-Policy": response_header(
                    "Only for a type a browser renders as a document (text/html, "
                    f"application/xhtml+xml, image/svg+xml): `{REPORT_HTML_CSP}`",
                    required=False,
                ),
            },
        },
        206: {
            "description": "Part of the artifact, for a `Range: bytes=<first>-<last>` request",
            "content": ARTIFACT_CONTENT,
            "headers": {
                "Content-Range": response_header("`bytes <first>-<last>/<size>`"),
            },
        },
        **PRESIGNED_REDIRECT,
        **problem_responses(
            400,
            401,
            404,
            416,
            503,
            headers={416: {"Content-Range": response_header("`bytes */<size>`")}},
        ),
    },
    summary="A file produced by the audit",
    description="`name`: a file name the report lists under a check's `artifacts`; a name "
    "the audit has no artifact of (or not a plain file name) is a 404.",
)
def read_artifact(
    audit_id: str,
    name: str,
    tenant: TenantDep,
    session: SessionDep,
    artifacts: ArtifactsDep,
) -> Response:
    audit = get_owned_audit(session, tenant, audit_id)
    row, info = rules.artifact_file(session, audit, artifacts, name)
    return stored_response(
        artifacts,
        row.path,
        info,
        media_type=row.media_type,
        filename=name,
        headers=security_headers(row.media_type),
        presign=True,
    )
