"""The rules of an audit, for `/v1/audits` and the console: what a submission must satisfy
(its references, callback, model, task fit, `compare_with`, the quota) and its idempotency, the
tenant's own audits (one, or a page), cancelling, and where its report and artifacts lie.

Decisions: an unknown or deleted `model_id` in a request body is a 422 naming `model_id` (the
body is what is wrong, as with an unknown dataset id); a model still `validating` or
`rejected` is a 409. The same Idempotency-Key with another body is a 422. A replay is found
before the per-tenant quota (`tenant_max_queued_audits` audits `queued`: 429 `too-many-audits`
with Retry-After), so a client retrying a lost answer never hits it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, load_only
from sqlalchemy.orm.interfaces import ORMOption

from schemas.audits import TERMINAL_STATES, AuditList, AuditRequest, strip_unset_regressions
from schemas.callback_targets import CallbackTargetRefused, check_target
from schemas.checks_classifier import task_problems
from schemas.common import SAFE_NAME, FileArray, UploadedArray
from schemas.comparisons import spec_problems
from schemas.datasets import DIGIT_CLASSES, BuiltinDataset, FileDataset, UploadedDataset
from schemas.endpoints import ENDPOINT_FORMAT, QUERY_ONLY_CHECKS
from schemas.model_spec import ModelSpec
from schemas.problem import FieldError
from service.db import lifecycle
from service.db.audit_status import STATUS_COLUMNS, to_status
from service.db.tables import Artifact, Audit, Model, Tenant, utcnow
from service.domain.errors import (
    AuditFinished,
    IdempotencyKeyReused,
    ModelNotReady,
    NotFound,
    ReportNotReady,
    TooManyAudits,
    ValidationFailed,
)
from service.domain.pagination import paginate, split_page
from service.domain.resource_rules import get_owned_dataset
from service.queue.broker import DEFAULT_PRIORITY, audit_queue
from service.settings import Settings
from service.storage.objects import ObjectInfo
from service.storage.stores import ArtifactStore

# Load what a status view needs (and tenant_id, for the ownership check); nothing else.
STATUS_ONLY = load_only(
    *(getattr(Audit, name) for name in (*STATUS_COLUMNS, "tenant_id")), raiseload=False
)

RETRY_AFTER_SECONDS = "2"
FILE_REFERENCE_REFUSED = (
    "file references are only accepted by the local CLI; upload the array with POST /v1/datasets"
)
CALLBACK_RESOLVE_SECONDS = 3.0


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
    (within CALLBACK_RESOLVE_SECONDS; the submit route runs in the thread pool, not on the event
    loop) and every address must be public unless TIGHTROPE_CALLBACK_ALLOW names the
    destination."""
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
    if model.format == ENDPOINT_FORMAT and field != ("model_id",):
        # a comparison runs both models on the same inputs through the runner's own code;
        # an endpoint is audited, never the reference it is compared with
        raise ValidationFailed(
            f"{name}: model {model_id!r} is an endpoint model; compare_with takes an "
            "uploaded model (docs/models.md, 'Endpoint models')",
            errors=[FieldError(loc=["body", *field], msg="an endpoint model", type="value_error")],
        )
    return model


def check_endpoint_audit(settings: Settings, request: AuditRequest, model: Model) -> None:
    """An endpoint model's audit: only the checks a query-only audit can run, and a query
    budget within the tenant's cap (422 naming the field)."""
    if model.format != ENDPOINT_FORMAT:
        return
    errors = [
        FieldError(
            loc=["body", "checks", index, "kind"],
            msg=f"{check.kind!r} needs the model's gradients or weights; an endpoint model's "
            f"audit runs only {', '.join(sorted(QUERY_ONLY_CHECKS))}",
            type="value_error",
        )
        for index, check in enumerate(request.checks)
        if check.kind not in QUERY_ONLY_CHECKS
    ]
    asked = request.budget.queries
    cap = settings.tenant_max_endpoint_queries
    if asked is not None and asked > cap:
        errors.append(
            FieldError(
                loc=["body", "budget", "queries"],
                msg=f"{asked} queries is more than the {cap} any one audit may send",
                type="value_error",
            )
        )
    if errors:
        raise ValidationFailed(
            f"model {model.id!r} is an endpoint model, audited by queries alone: "
            + "; ".join(e.msg for e in errors),
            errors=errors,
        )


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


def find_replay(session: Session, tenant: Tenant, key: str, request_hash: str) -> Audit | None:
    """The tenant's audit submitted under this Idempotency-Key; another body is a 422."""
    audit = session.scalar(
        select(Audit).where(Audit.tenant_id == tenant.id, Audit.idempotency_key == key)
    )
    if audit is not None and audit.request_hash != request_hash:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was used with a different request body; use a new key."
        )
    return audit


@dataclass(frozen=True)
class Submission:
    """The audit a submission stored (`replayed`: the earlier audit of its Idempotency-Key)."""

    audit: Audit
    replayed: bool = False


def submit(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    request: AuditRequest,
    idempotency_key: str | None,
) -> Submission:
    """Every rule of a submission, in order, then the `queued` row, committed. The caller sends
    the task only for a new audit, and only after this returns (a lost message is re-sent by the
    reconciler; a message for a row not yet committed would find nothing)."""
    canonical, request_hash = canonical_request(request)
    if idempotency_key is not None:
        earlier = find_replay(session, tenant, idempotency_key, request_hash)
        if earlier is not None:
            return Submission(earlier, replayed=True)
    check_references(session, tenant, request)
    check_callback_url(settings, request)
    model = check_model(session, tenant, request.model_id)
    check_fits_model(session, tenant, request, model)
    check_endpoint_audit(settings, request, model)
    check_reference(session, tenant, request, model)
    check_quota(session, settings, tenant)
    audit = lifecycle.new_audit(
        tenant_id=tenant.id,
        model_id=request.model_id,
        request=canonical,
        request_hash=request_hash,
        idempotency_key=idempotency_key,
        queue=audit_queue(request.device),
        priority=request.priority,
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
        earlier = find_replay(session, tenant, idempotency_key, request_hash)
        if earlier is None:
            raise
        return Submission(earlier, replayed=True)
    return Submission(audit)


def get_owned_audit(
    session: Session, tenant: Tenant, audit_id: str, options: Sequence[ORMOption] = ()
) -> Audit:
    """The tenant's audit; another tenant's is as unknown as a missing one (404)."""
    audit = session.get(Audit, audit_id, options=options)
    if audit is None or audit.tenant_id != tenant.id:
        raise NotFound(f"No audit {audit_id!r}.")
    return audit


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
    query = select(Audit).options(STATUS_ONLY).where(Audit.tenant_id == tenant.id)
    if status is not None:
        query = query.where(Audit.status == status)
    if model_id is not None:
        query = query.where(Audit.model_id == model_id)
    query = paginate(query, Audit.created_at, Audit.id, page_token, page_size)
    rows, next_token = split_page(list(session.scalars(query)), page_size)
    return AuditList(items=[to_status(a) for a in rows], next_page_token=next_token)


def cancel(session: Session, tenant: Tenant, audit_id: str) -> tuple[Audit, bool]:
    """Cancel the tenant's audit (409 once finished), committed. A queued audit ends at once;
    a running one stops at its next checkpoint (service.db.lifecycle.cancel). Gives the audit
    (not yet refreshed) and whether it ended here, in which case no worker will touch it
    again: the caller announces it."""
    audit = get_owned_audit(session, tenant, audit_id)
    if audit.status in TERMINAL_STATES:
        raise AuditFinished(f"Audit {audit_id!r} has already {audit.status}; nothing to cancel.")
    ended = lifecycle.cancel(session, audit_id, utcnow())
    session.commit()
    return audit, ended


def path_inside(root: Path, relative: str) -> Path:
    """root/relative, refusing anything that resolves outside root."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise NotFound("No such file.")
    return path


def report_file(audit: Audit, artifacts: ArtifactStore, name: str) -> tuple[str, ObjectInfo]:
    """The stored report file `name` (`report` or `report.html`) of a succeeded audit, as its
    key in the artifact store and what the store says of it: 409 before (with Retry-After
    while it may still succeed), 404 when the file is missing."""
    if audit.status != "succeeded" or not audit.report_path:
        raise ReportNotReady(
            f"Audit {audit.id!r} is {audit.status}; the report exists once it has succeeded.",
            headers={"Retry-After": RETRY_AFTER_SECONDS}
            if audit.status not in TERMINAL_STATES
            else {},
        )
    key = audit.report_path
    if name != "report":
        key = posixpath.join(posixpath.dirname(key), name)
    info = artifacts.locate(key)
    if info is None:
        raise NotFound(f"Audit {audit.id!r} has no {name}.")
    return key, info


def artifact_file(
    session: Session, audit: Audit, artifacts: ArtifactStore, name: str
) -> tuple[Artifact, ObjectInfo]:
    """The audit's artifact `name` and what the store says of its file: 404 for a name the
    audit has no artifact of (or not a plain file name), a path outside the store, or a file
    that is gone."""
    row = session.get(Artifact, (audit.id, name)) if SAFE_NAME.match(name) else None
    if row is None:
        raise NotFound(f"Audit {audit.id!r} has no artifact {name!r}.")
    info = artifacts.locate(row.path)
    if info is None:
        raise NotFound(f"Audit {audit.id!r} has no artifact {name!r}.")
    return row, info
