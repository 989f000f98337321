"""`/v1/datasets`: upload `.npy`/`.npz` image arrays (no pickles), list, read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from schemas.datasets import DatasetUploadSpec
from schemas.resources import DatasetList, DatasetResource
from service.api.deps import (
    BlobsDep,
    PageTokenQuery,
    SessionDep,
    SettingsDep,
    TenantDep,
    TenantLookupDep,
    session_in_slot,
)
from service.api.forms import archive_limits, multipart_upload_body, parse_spec
from service.api.inspect_dataset import inspect_dataset
from service.api.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, paginate, split_page
from service.api.problems import NotFound, problem_responses, response_header
from service.api.uploads import receive_upload
from service.db.models import Dataset, Tenant

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_BODY = multipart_upload_body(
    ".npy or .npz of images [N, C, H, W] (no pickles)",
    DatasetUploadSpec,
    "The dataset's name and arrays, as JSON (a DatasetUploadSpec); errors name it as "
    "`spec.<field>`",
)


def to_resource(dataset: Dataset) -> DatasetResource:
    return DatasetResource(
        id=dataset.id,
        name=dataset.name,
        format=dataset.format,
        sha256=dataset.sha256,
        size_bytes=dataset.size_bytes,
        shape=dataset.shape["images"],
        arrays=dataset.shape["arrays"],
        labels=dataset.shape.get("labels"),
        created_at=dataset.created_at,
    )


def get_owned_dataset(session: Session, tenant: Tenant, dataset_id: str) -> Dataset | None:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant.id or dataset.deleted_at is not None:
        return None
    return dataset


@router.post(
    "",
    status_code=201,
    response_model=DatasetResource,
    openapi_extra=UPLOAD_BODY,
    responses={
        201: {
            "description": "Stored",
            "headers": {"Location": response_header("The dataset: /v1/datasets/{id}")},
        },
        **problem_responses(400, 401, 413, 415, 422, 503),
    },
    summary="Upload an array of images",
)
async def upload_dataset(
    request: Request,
    response: Response,
    tenant: TenantLookupDep,
    settings: SettingsDep,
    blobs: BlobsDep,
) -> DatasetResource:
    with await receive_upload(request, blobs, settings.max_upload_bytes) as staged:
        spec = parse_spec(DatasetUploadSpec, staged.fields.get("spec"), settings.max_json_depth)
        inspection = await run_in_threadpool(
            inspect_dataset, staged.path, spec.key, archive_limits(settings), spec.labels_key
        )
        staged.commit(blobs)

    def store(session: Session) -> Dataset:
        spec_json = spec.model_dump(mode="json")
        # The images array actually used, so workers need not guess the .npz's first array.
        spec_json["key"] = inspection.images_key
        dataset = Dataset(
            tenant_id=tenant.id,
            name=spec.name,
            spec=spec_json,
            format=inspection.format,
            sha256=staged.sha256,
            size_bytes=staged.size,
            shape={
                "images": inspection.shape,
                "arrays": inspection.arrays,
                "labels": inspection.labels,
            },
        )
        session.add(dataset)
        session.commit()
        return dataset

    async with session_in_slot(request) as session:
        dataset = await run_in_threadpool(store, session)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return to_resource(dataset)


@router.get("", response_model=DatasetList, responses=problem_responses(401, 422, 503))
def list_datasets(
    tenant: TenantDep,
    session: SessionDep,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    page_token: PageTokenQuery = None,
) -> DatasetList:
    query = select(Dataset).where(Dataset.tenant_id == tenant.id, Dataset.deleted_at.is_(None))
    query = paginate(query, Dataset.created_at, Dataset.id, page_token, page_size)
    rows, next_token = split_page(list(session.scalars(query)), page_size)
    return DatasetList(items=[to_resource(d) for d in rows], next_page_token=next_token)


@router.get(
    "/{dataset_id}",
    response_model=DatasetResource,
    responses=problem_responses(401, 404, 503),
)
def read_dataset(dataset_id: str, tenant: TenantDep, session: SessionDep) -> DatasetResource:
    dataset = get_owned_dataset(session, tenant, dataset_id)
    if dataset is None:
        raise NotFound(f"No dataset {dataset_id!r}.")
    return to_resource(dataset)
