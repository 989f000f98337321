"""`/v1/models`: upload (202, admitted later by a worker), register an endpoint (202, probed
later by a worker), list, read, soft delete."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from schemas.endpoints import EndpointRegistration
from schemas.model_spec import ModelSpec
from schemas.resources import ModelList, ModelResource
from service.api.deps import (
    DispatcherDep,
    PageTokenQuery,
    SessionDep,
    SettingsDep,
    TenantDep,
    TenantLookupDep,
)
from service.api.forms import multipart_upload_body
from service.api.inspect_upload import inspect_model
from service.api.problems import problem_responses, response_header
from service.api.upload_flow import UploadsDep, upload_route
from service.domain import resource_rules as rules
from service.domain.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

router = APIRouter(prefix="/v1/models", tags=["models"])
# Its own path, not /v1/endpoint-models, which /v1/models/{model_id} would also match
# (GET and DELETE on a "model" called `endpoints`).
endpoint_router = APIRouter(prefix="/v1/endpoint-models", tags=["models"])

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


@endpoint_router.post(
    "",
    status_code=202,
    response_model=ModelResource,
    responses={
        202: {
            "description": "Stored as `validating`; a worker probes the endpoint and admits "
            "(`ready`) or rejects it",
            "headers": {"Location": response_header("The model: /v1/models/{id}")},
        },
        **problem_responses(400, 401, 413, 415, 422, 503),
    },
    summary="Register a model by its inference endpoint; a worker probes it",
)
def register_endpoint(
    registration: EndpointRegistration,
    response: Response,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
) -> ModelResource:
    """An Open Inference Protocol endpoint (docs/models.md, "Endpoint models"): its URL, the
    model's name and version, the spec as for uploads, an auth header whose value is
    write-only, and the limits the workers hold to."""
    model = rules.new_endpoint_model(tenant, registration, settings)
    session.add(model)
    session.commit()
    # After the commit: if this send fails, the reconciler finds the model in `validating`.
    dispatcher.admission(model.id)
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
