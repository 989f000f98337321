"""`/v1/audits`: submit (202, committed before it is enqueued), poll with ETags, list, cancel,
and fetch the report and artifacts once done.

Decisions: an unknown or deleted `model_id` in a request body is a 422 naming `model_id` (the
body is what is wrong, as with an unknown dataset id); a model still `validating` or
`rejected` is a 409. An `Idempotency-Key` replay answers 202 with the original audit and the
header `Idempotent-Replayed: true`; the same key with another body is a 422. A replay is
answered before the per-tenant quota (`tenant_max_queued_audits` audits `queued`: 429
`too-many-audits` with Retry-After), so a client retrying a lost answer never hits it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, load_only
from sqlalchemy.orm.interfaces import ORMOption

from schemas.audits import (
    TERMINAL_STATES,
    AuditList,
    AuditRequest,
    AuditState,
    AuditStatus,
    strip_unset_regressions,
)
from schemas.callback_targets import CallbackTargetRefused, check_target
from schemas.checks_classifier import task_problems
from schemas.common import FileArray, UploadedArray
from schemas.comparisons import spec_problems
from schemas.datasets import DIGIT_CLASSES, BuiltinDataset, FileDataset, UploadedDataset
from schemas.model_spec import ModelSpec
from schemas.problem import FieldError
from schemas.reports import Report
from service.api.audit_views import (
    STATUS_COLUMNS,
    check_progress,
    if_none_match_hits,
    status_etag,
    to_status,
)
from service.api.datasets import get_owned_dataset
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
from service.api.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, paginate, split_page
from service.api.poll_cache import (
    AuditListCache,
    CachedPoll,
    PollCache,
    list_cache_key,
    list_response,
    poll_response,
)
from service.api.problems import (
    AuditFinished,
    IdempotencyKeyReused,
    ModelNotReady,
    NotFound,
    ReportNotReady,
    TooManyAudits,
    ValidationFailed,
    problem_responses,
    response_header,
    retry_after_header,
)
from service.api.stored_files import StoredFileResponse
from service.db.models import Artifact, Audit, AuditShard, Model, Tenant, utcnow
from service.queue.broker import DEFAULT_PRIORITY, audit_queue
from service.reports.junit import MEDIA_TYPE as JUNIT_MEDIA_TYPE
from service.reports.junit import render_junit
from service.settings import Settings
from service.storage.stores import SAFE_NAME

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/audits", tags=["audits"])

# Load what a status view needs (and tenant_id, for the ownership check); nothing else.
_STATUS_ONLY = load_only(
    *(getattr(Audit, name) for name in (*STATUS_COLUMNS, "tenant_id")), raiseload=False
)

RETRY_AFTER_SECONDS = "2"
FILE_REFERENCE_REFUSED = (
    "file references are only accepted by the local CLI; upload the array with POST /v1/datasets"
)
CALLBACK_RESOLVE_SECONDS = 3.0
REPORT_FILES = {"report": "application/json", "report.html": "text/html; charset=utf-8"}
# The report page needs no script and no request (figures are data URIs): forbid both.
REPORT_HTML_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# Media types a browser renders as a document that could run script: served, wherever they come
# from (report.html or an artifact), with the report page's security headers.
ACTIVE_MEDIA_TYPES = frozenset({"text/html", "application/xhtml+xml", "image/svg+xml"})


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
# file's name (workers/execution/jobs.py, `mimetypes`), application/octet-stream when it knows
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


def security_headers(media_type: str) -> dict[str, str] | None:
    """The headers an answer of this media type needs: the CSP for documents, else none."""
    essence = media_type.split(";", 1)[0].strip().lower()
    return {"Content-Security-Policy": REPORT_HTML_CSP} if essence in ACTIVE_MEDIA_TYPES else None


def canonical_request(request: AuditRequest) -> tuple[dict[str, Any], str]:
    """The request with every default filled in, and its sha256 (keys sorted, no spaces).

    `priority` lives in its own column (Audit.priority), not in the stored request, which stays
    the audit's config plus `model_id` for the workers. The hash covers it unless it is the
    default, so another priority under the same Idempotency-Key is another body, while the
    hashes of requests stored before priorities existed still match their replays."""
    # without compare_with (and max_regression) the request reads as it did before they existed
    exclude = {"priority"} | ({"compare_with"} if request.compare_with is None else set())
    canonical = strip_unset_regressions(
        request.model_dump(mode="json", by_alias=True, exclude=exclude)
    )
    hashed = canonical
    if request.priority != DEFAULT_PRIORITY:
        hashed = {**canonical, "priority": request.priority}
    encoded = json.dumps(hashed, sort_keys=True, separators=(",", ":")).encode()
    return canonical, hashlib.sha256(encoded).hexdigest()


def _array_references(request: AuditRequest) -> list[tuple[list[str | int], Any]]:
    """(location, reference) of the dataset and of every array the operator names."""
    refs: list[tuple[list[str | int], Any]] = [(["body", "dataset"], request.dataset)]
    operator_fields = request.operator.__dict__ if request.operator is not None else {}
    for name, value in operator_fields.items():
        if isinstance(value, UploadedArray | FileArray):
            refs.append((["body", "operator", name], value))
    return refs


def check_references(session: Session, tenant: Tenant, request: AuditRequest) -> None:
    """Refuse local files; every uploaded dataset (and array key) must be the tenant's."""
    errors: list[FieldError] = []
    for loc, ref in _array_references(request):
        if isinstance(ref, FileDataset | FileArray):
            errors.append(
                FieldError(loc=[*loc, "file"], msg=FILE_REFERENCE_REFUSED, type="value_error")
            )
        elif isinstance(ref, UploadedDataset | UploadedArray):
            dataset = get_owned_dataset(session, tenant, ref.dataset_id)
            if dataset is None:
                msg = f"no dataset {ref.dataset_id!r}; upload it with POST /v1/datasets"
                errors.append(FieldError(loc=[*loc, "dataset_id"], msg=msg, type="not_found"))
                continue
            key = getattr(ref, "key", None)
            if key is not None and key not in dataset.shape["arrays"]:
                msg = f"dataset {ref.dataset_id!r} has no array {key!r}"
                errors.append(FieldError(loc=[*loc, "key"], msg=msg, type="not_found"))
    if errors:
        if any(e.msg == FILE_REFERENCE_REFUSED for e in errors):
            detail = FILE_REFERENCE_REFUSED
        else:
            detail = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors)
        raise ValidationFailed(detail, errors=errors)


def check_callback_url(settings: Settings, request: AuditRequest) -> None:
    """The callback may not reach inside (docs/security.md, "Callbacks"): the host is resolved
    (within CALLBACK_RESOLVE_SECONDS; this route runs in the thread pool, not on the event loop)
    and every address must be public unless TIGHTROPE_CALLBACK_ALLOW names the destination."""
    if request.callback_url is None:
        return
    try:
        check_target(
            str(request.callback_url),
            settings.callback_allow_list,
            timeout=CALLBACK_RESOLVE_SECONDS,
        )
    except CallbackTargetRefused as exc:
        raise ValidationFailed(
            f"callback_url: {exc}",
            errors=[FieldError(loc=["body", "callback_url"], msg=str(exc), type="value_error")],
        ) from None


def check_model(
    session: Session, tenant: Tenant, model_id: str, field: tuple[str, ...] = ("model_id",)
) -> Model:
    """The tenant's model named by the body's `field`: unknown is a 422 naming the field,
    not ready a 409 (the audited model's `model_id`, or `compare_with.model_id`)."""
    name = ".".join(field)
    role = "" if field == ("model_id",) else f" ({field[0]})"
    model = session.get(Model, model_id)
    if model is None or model.tenant_id != tenant.id or model.deleted_at is not None:
        raise ValidationFailed(
            f"{name}: no model {model_id!r}; upload one with POST /v1/models",
            errors=[FieldError(loc=["body", *field], msg="unknown model", type="not_found")],
        )
    if model.status == "validating":
        raise ModelNotReady(
            f"Model {model_id!r}{role} is still being validated; retry when its status is 'ready'.",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    if model.status != "ready":
        raise ModelNotReady(
            f"Model {model_id!r}{role} was rejected: {model.reason or 'no reason given'}"
        )
    return model


def check_reference(session: Session, tenant: Tenant, request: AuditRequest, model: Model) -> None:
    """`compare_with.model_id`: a ready model of the tenant (`check_model`), with the audited
    model's task, input, image shape, classes and value range (422)."""
    if request.compare_with is None:
        return
    loc: list[str | int] = ["body", "compare_with", "model_id"]
    reference_id = request.compare_with.model_id
    reference = check_model(session, tenant, reference_id, field=("compare_with", "model_id"))
    problems = spec_problems(
        ModelSpec.model_validate(model.spec), ModelSpec.model_validate(reference.spec)
    )
    if problems:
        raise ValidationFailed(
            f"compare_with.model_id: model {reference_id!r} cannot be audited on the same "
            f"inputs as {model.id!r}: " + "; ".join(problems),
            errors=[FieldError(loc=loc, msg=p, type="value_error") for p in problems],
        )


def check_fits_model(session: Session, tenant: Tenant, request: AuditRequest, model: Model) -> None:
    """The checks, operator and dataset must fit the model's task (docs/classifiers.md)."""
    spec = ModelSpec.model_validate(model.spec)
    problems = task_problems(
        spec.task,
        [check.kind for check in request.checks],
        has_operator=request.operator is not None,
        has_baseline=request.baseline is not None,
    )
    if spec.task == "classification":
        assert spec.num_classes is not None  # the spec's validator requires it
        problems.extend(_label_problems(session, tenant, request, spec.num_classes))
    if problems:
        detail = "; ".join(problems)
        raise ValidationFailed(
            f"the audit does not fit model {model.id!r} (task {spec.task!r}): {detail}",
            errors=[FieldError(loc=["body"], msg=p, type="value_error") for p in problems],
        )


def _label_problems(
    session: Session, tenant: Tenant, request: AuditRequest, num_classes: int
) -> list[str]:
    """A classifier audit needs labelled images: built-in digits or an .npz with labels."""
    dataset = request.dataset
    if isinstance(dataset, BuiltinDataset):
        if dataset.builtin != "digits":
            return [f"built-in dataset {dataset.builtin!r} has no labels; use 'digits'"]
        if num_classes < DIGIT_CLASSES:
            return [f"built-in digits have {DIGIT_CLASSES} classes; the model has {num_classes}"]
        return []
    if isinstance(dataset, UploadedDataset):
        row = get_owned_dataset(session, tenant, dataset.dataset_id)
        labels = (row.shape or {}).get("labels") if row is not None else None
        if row is not None and labels is None:
            return [
                f"dataset {dataset.dataset_id!r} has no labels; upload an .npz with arrays "
                "`images` and `labels`"
            ]
        if labels is not None and labels["max"] >= num_classes:
            return [
                f"dataset {dataset.dataset_id!r} has labels up to {labels['max']}; the model "
                f"has {num_classes} classes"
            ]
    return []


def get_owned_audit(
    session: Session, tenant: Tenant, audit_id: str, options: Sequence[ORMOption] = ()
) -> Audit:
    audit = session.get(Audit, audit_id, options=options)
    if audit is None or audit.tenant_id != tenant.id:
        raise NotFound(f"No audit {audit_id!r}.")
    return audit


def _accepted(audit: Audit, replayed: bool = False) -> Response:
    status = to_status(audit)
    headers = {"Location": status.links.self, "Retry-After": RETRY_AFTER_SECONDS}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        status.model_dump_json(), status_code=202, media_type="application/json", headers=headers
    )


def check_quota(session: Session, settings: Settings, tenant: Tenant) -> None:
    """At most tenant_max_queued_audits of a tenant's audits wait to start (docs/http-api.md).
    A soft limit: two submissions at the same instant may both pass it by one."""
    limit = settings.tenant_max_queued_audits
    queued = session.scalar(
        select(func.count())
        .select_from(Audit)
        .where(Audit.tenant_id == tenant.id, Audit.status == "queued")
    )
    if (queued or 0) >= limit:
        raise TooManyAudits(limit=limit, queued=int(queued or 0))


def _replay(session: Session, tenant: Tenant, key: str, request_hash: str) -> Audit | None:
    audit = session.scalar(
        select(Audit).where(Audit.tenant_id == tenant.id, Audit.idempotency_key == key)
    )
    if audit is not None and audit.request_hash != request_hash:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was used with a different request body; use a new key."
        )
    return audit


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
    canonical, request_hash = canonical_request(body)
    if idempotency_key is not None:
        earlier = _replay(session, tenant, idempotency_key, request_hash)
        if earlier is not None:
            return _accepted(earlier, replayed=True)
    check_references(session, tenant, body)
    check_callback_url(settings, body)
    model = check_model(session, tenant, body.model_id)
    check_fits_model(session, tenant, body, model)
    check_reference(session, tenant, body, model)
    check_quota(session, settings, tenant)
    audit = Audit(
        tenant_id=tenant.id,
        model_id=body.model_id,
        request=canonical,
        request_hash=request_hash,
        idempotency_key=idempotency_key,
        status="queued",
        queue=audit_queue(body.device),
        priority=body.priority,
        enqueued_at=utcnow(),
    )
    session.add(audit)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race: answer with its audit.
        session.rollback()
        if idempotency_key is None:
            raise
        earlier = _replay(session, tenant, idempotency_key, request_hash)
        if earlier is None:
            raise
        return _accepted(earlier, replayed=True)
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


def list_page(
    session: Session,
    tenant: Tenant,
    status: str | None,
    model_id: str | None,
    page_size: int,
    page_token: str | None,
) -> AuditList:
    # Only the columns of the view (not the request JSON); no relationship is read, so no
    # per-row query. Index: ix_audits_tenant_created (tenant_id, created_at, id).
    query = select(Audit).options(_STATUS_ONLY).where(Audit.tenant_id == tenant.id)
    if status is not None:
        query = query.where(Audit.status == status)
    if model_id is not None:
        query = query.where(Audit.model_id == model_id)
    query = paginate(query, Audit.created_at, Audit.id, page_token, page_size)
    rows, next_token = split_page(list(session.scalars(query)), page_size)
    return AuditList(items=[to_status(a) for a in rows], next_page_token=next_token)


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
    audit = get_owned_audit(session, tenant, audit_id, options=(_STATUS_ONLY,))
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
    audit = get_owned_audit(session, tenant, audit_id)
    if audit.status in TERMINAL_STATES:
        raise AuditFinished(f"Audit {audit_id!r} has already {audit.status}; nothing to cancel.")
    now = utcnow()
    ended_now = False
    # Conditional updates: a worker may take the audit between our read and our write.
    cancelled_queued = session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
    )
    if cancelled_queued.rowcount == 0:  # type: ignore[attr-defined]
        requested = session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.status.not_in(TERMINAL_STATES))
            .values(cancel_requested=True, updated_at=now)
        )
        if requested.rowcount == 1:  # type: ignore[attr-defined]
            # Running: no worker may claim its waiting shards any more; the workers running
            # one stop it themselves (they see cancel_requested), and finished ones stay done.
            session.execute(
                update(AuditShard)
                .where(AuditShard.audit_id == audit_id, AuditShard.status == "queued")
                .values(status="cancelled", finished_at=now)
            )
            ended_now = _end_if_no_shard_runs(session, audit_id, now)
    session.commit()
    # The canceller's next poll must see the cancel (read your own writes), not a cached answer.
    request.app.state.poll_cache.forget(audit_id)
    request.app.state.audit_list_cache.forget_tenant(tenant.id)
    session.refresh(audit)
    if (cancelled_queued.rowcount == 1 or ended_now) and audit.request.get("callback_url"):  # type: ignore[attr-defined]
        # No worker will touch this audit again: announce it from here (after the commit).
        dispatcher.callback(audit.id)
    return to_status(audit)


def _end_if_no_shard_runs(session: Session, audit_id: str, now: datetime) -> bool:
    """An audit in its shard phase (no task holds it) with no shard running has nobody left to
    notice the cancel: it ends here. With a shard running, that shard's worker ends it."""
    running_shard = exists().where(AuditShard.audit_id == audit_id, AuditShard.status == "running")
    ended = session.execute(
        update(Audit)
        .where(
            Audit.id == audit_id,
            Audit.status == "running",
            Audit.lease_owner.is_(None),
            Audit.shards_total > 0,
            ~running_shard,
        )
        .values(status="cancelled", finished_at=now, updated_at=now)
    )
    return bool(ended.rowcount == 1)  # type: ignore[attr-defined]


def path_inside(root: Path, relative: str) -> Path:
    """root/relative, refusing anything that resolves outside root."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise NotFound("No such file.")
    return path


def report_file(audit: Audit, artifact_root: Path, name: str) -> FileResponse:
    if audit.status != "succeeded" or not audit.report_path:
        raise ReportNotReady(
            f"Audit {audit.id!r} is {audit.status}; the report exists once it has succeeded.",
            headers={"Retry-After": RETRY_AFTER_SECONDS}
            if audit.status not in TERMINAL_STATES
            else {},
        )
    report = path_inside(artifact_root, audit.report_path)
    path = report if name == "report" else report.with_name(name)
    if not path.is_file():
        raise NotFound(f"Audit {audit.id!r} has no {name}.")
    media_type = REPORT_FILES[name]
    return StoredFileResponse(path, media_type=media_type, headers=security_headers(media_type))


@router.get(
    "/{audit_id}/report",
    # The route sends the stored report.json as it is (a FileResponse, so FastAPI does not
    # serialise it through this model); the worker validated it against Report before writing.
    response_model=Report,
    responses={
        200: {"description": "The JSON report (signed; docs/reports.md)"},
        **problem_responses(401, 404, 409, 503, headers=REPORT_RETRY_AFTER),
    },
    summary="The JSON report of a succeeded audit",
)
def read_report(
    audit_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    return report_file(get_owned_audit(session, tenant, audit_id), settings.artifact_dir, "report")


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
    audit_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    audit = get_owned_audit(session, tenant, audit_id)
    return report_file(audit, settings.artifact_dir, "report.html")


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
    audit_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep
) -> Response:
    audit = get_owned_audit(session, tenant, audit_id)
    stored = report_file(audit, settings.artifact_dir, "report")
    try:
        report = json.loads(Path(stored.path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
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
) -> FileResponse:
    audit = get_owned_audit(session, tenant, audit_id)
    row = session.get(Artifact, (audit.id, name)) if SAFE_NAME.match(name) else None
    if row is None:
        raise NotFound(f"Audit {audit_id!r} has no artifact {name!r}.")
    path = path_inside(artifacts.root, row.path)
    if not path.is_file():
        raise NotFound(f"Audit {audit_id!r} has no artifact {name!r}.")
    return StoredFileResponse(
        path, media_type=row.media_type, filename=name, headers=security_headers(row.media_type)
    )
