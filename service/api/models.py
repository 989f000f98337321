"""`/v1/models`: upload (202, admitted later by a worker), list, read, soft delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from schemas.model_spec import ModelSpec
from schemas.resources import ModelList, ModelResource
from service.api.deps import (
    BlobsDep,
    DispatcherDep,
    PageTokenQuery,
    SessionDep,
    SettingsDep,
    TenantDep,
    TenantLookupDep,
    session_in_slot,
)
from service.api.forms import archive_limits, multipart_upload_body, parse_spec
from service.api.inspect_upload import inspect_model
from service.api.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, paginate, split_page
from service.api.problems import NotFound, problem_responses, response_header
from service.api.uploads import receive_upload
from service.db.models import Model, Tenant, utcnow

router = APIRouter(prefix="/v1/models", tags=["models"])

UPLOAD_BODY = multipart_upload_body(
    "TorchScript .pt, torch.export .pt2, .safetensors or ONNX .onnx",
    ModelSpec,
    "What the model is, as JSON (a ModelSpec); errors name it as `spec.<field>`",
)


def to_resource(model: Model) -> ModelResource:
    info = model.admission_info or {}
    stochastic = info.get("stochastic")
    spread = info.get("output_spread")
    return ModelResource(
        id=model.id,
        name=model.name,
        status=model.status,
        reason=model.reason,
        format=model.format,
        sha256=model.sha256,
        size_bytes=model.size_bytes,
        spec=ModelSpec.model_validate(model.spec),
        stochastic=stochastic if isinstance(stochastic, bool) else None,
        output_spread=float(spread) if isinstance(spread, int | float) else None,
        created_at=model.created_at,
        updated_at=model.updated_at,
    )


def get_owned_model(session: Session, tenant: Tenant, model_id: str) -> Model:
    """A live model of this tenant; another tenant's model is as unknown as a missing one."""
    model = session.get(Model, model_id)
    if model is None or model.tenant_id != tenant.id or model.deleted_at is not None:
        raise NotFound(f"No model {model_id!r}.")
    return model


@router.post(
    "",
    status_code=202,
    response_model=ModelResource,
    openapi_extra=UPLOAD_BODY,
    responses={
        202: {
            "description": "Stored as `validating`; a worker admits (`ready`) or rejects it",
            "headers": {"Location": response_header("The model: /v1/models/{id}")},
        },
        **problem_responses(400, 401, 413, 415, 422, 503),
    },
    summary="Upload a model; a worker admits or rejects it",
)
async def upload_model(
    request: Request,
    response: Response,
    tenant: TenantLookupDep,
    settings: SettingsDep,
    blobs: BlobsDep,
    dispatcher: DispatcherDep,
) -> ModelResource:
    with await receive_upload(request, blobs, settings.max_upload_bytes) as staged:
        spec = parse_spec(ModelSpec, staged.fields.get("spec"), settings.max_json_depth)
        inspection = await run_in_threadpool(
            inspect_model, staged.path, spec, archive_limits(settings)
        )
        staged.commit(blobs)

    def store(session: Session) -> Model:
        model = Model(
            tenant_id=tenant.id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            format=inspection.format,
            sha256=staged.sha256,
            size_bytes=staged.size,
            status="validating",
            admission_info={"upload": inspection.info, "filename": staged.filename},
        )
        session.add(model)
        session.commit()
        return model

    async with session_in_slot(request) as session:
        model = await run_in_threadpool(store, session)
    # After the commit: if this send fails, the reconciler finds the model in `validating`.
    await run_in_threadpool(dispatcher.admission, model.id)
    response.headers["Location"] = f"/v1/models/{model.id}"
    return to_resource(model)


@router.get("", response_model=ModelList, responses=problem_responses(401, 422, 503))
def list_models(
    tenant: TenantDep,
    session: SessionDep,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    page_token: PageTokenQuery = None,
    sha256: Annotated[
        str | None,
        Query(
            pattern="^[0-9a-f]{64}$",
            description="Only models whose file has this sha256 (lower-case hex)",
        ),
    ] = None,
) -> ModelList:
    query = select(Model).where(Model.tenant_id == tenant.id, Model.deleted_at.is_(None))
    if sha256 is not None:
        query = query.where(Model.sha256 == sha256)
    query = paginate(query, Model.created_at, Model.id, page_token, page_size)
    rows, next_token = split_page(list(session.scalars(query)), page_size)
    return ModelList(items=[to_resource(m) for m in rows], next_page_token=next_token)


@router.get("/{model_id}", response_model=ModelResource, responses=problem_responses(401, 404, 503))
def read_model(model_id: str, tenant: TenantDep, session: SessionDep) -> ModelResource:
    return to_resource(get_owned_model(session, tenant, model_id))


@router.delete(
    "/{model_id}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(401, 404, 503),
)
def delete_model(model_id: str, tenant: TenantDep, session: SessionDep) -> Response:
    """Soft delete: the row stays for the audits that name it; the model is gone for clients."""
    model = get_owned_model(session, tenant, model_id)
    model.deleted_at = utcnow()
    session.commit()
    return Response(status_code=204)
