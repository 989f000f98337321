"""`/v1/models`: upload (202, admitted later by a worker), list, read, soft delete."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from schemas.model_spec import ModelSpec
from schemas.resources import ModelList, ModelResource
from service.api.deps import DispatcherDep, PageTokenQuery, SessionDep, TenantDep, TenantLookupDep
from service.api.forms import multipart_upload_body
from service.api.inspect_upload import inspect_model
from service.api.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from service.api.problems import problem_responses
from service.api.rules import resources as rules
from service.api.upload_flow import UploadsDep, upload_route

router = APIRouter(prefix="/v1/models", tags=["models"])

UPLOAD_BODY = multipart_upload_body(
    "TorchScript .pt, torch.export .pt2, .safetensors or ONNX .onnx",
    ModelSpec,
    "What the model is, as JSON (a ModelSpec); errors name it as `spec.<field>`",
)


@router.post(
    "",
    **upload_route(
        202,
        ModelResource,
        UPLOAD_BODY,
        "Stored as `validating`; a worker admits (`ready`) or rejects it",
        "The model: /v1/models/{id}",
        summary="Upload a model; a worker admits or rejects it",
    ),
)
async def upload_model(
    response: Response, tenant: TenantLookupDep, uploads: UploadsDep, dispatcher: DispatcherDep
) -> ModelResource:
    build = partial(rules.new_model, tenant)
    model = await uploads.receive_and_store(ModelSpec, inspect_model, build)
    # After the commit: if this send fails, the reconciler finds the model in `validating`.
    await run_in_threadpool(dispatcher.admission, model.id)
    response.headers["Location"] = f"/v1/models/{model.id}"
    return rules.model_resource(model)


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
    return rules.model_page(session, tenant, page_size, page_token, sha256)


@router.get("/{model_id}", response_model=ModelResource, responses=problem_responses(401, 404, 503))
def read_model(model_id: str, tenant: TenantDep, session: SessionDep) -> ModelResource:
    return rules.model_resource(rules.get_owned_model(session, tenant, model_id))


@router.delete(
    "/{model_id}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(401, 404, 503),
)
def delete_model(model_id: str, tenant: TenantDep, session: SessionDep) -> Response:
    """Soft delete: the row stays for the audits that name it; the model is gone for clients."""
    rules.delete_owned_model(session, tenant, model_id)
    return Response(status_code=204)
