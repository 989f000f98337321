"""`/v1/datasets`: upload `.npy`/`.npz` image arrays (no pickles), list, read."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response

from schemas.archive_rules import ArchiveLimits
from schemas.datasets import DatasetUploadSpec
from schemas.resources import DatasetList, DatasetResource
from service.api.deps import PageTokenQuery, SessionDep, TenantDep, TenantLookupDep
from service.api.forms import multipart_upload_body
from service.api.inspect_dataset import DatasetInspection, inspect_dataset
from service.api.problems import problem_responses
from service.api.upload_flow import UploadsDep, upload_route
from service.domain import resource_rules as rules
from service.domain.errors import NotFound
from service.domain.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_BODY = multipart_upload_body(
    ".npy or .npz of images [N, C, H, W] (no pickles)",
    DatasetUploadSpec,
    "The dataset's name and arrays, as JSON (a DatasetUploadSpec); errors name it as "
    "`spec.<field>`",
)


@router.post(
    "",
    **upload_route(
        201,
        DatasetResource,
        UPLOAD_BODY,
        "Stored",
        "The dataset: /v1/datasets/{id}",
        summary="Upload an array of images",
    ),
)
async def upload_dataset(
    response: Response, tenant: TenantLookupDep, uploads: UploadsDep
) -> DatasetResource:
    build = partial(rules.new_dataset, tenant)
    dataset = await uploads.receive_and_store(DatasetUploadSpec, _inspect, build)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return rules.dataset_resource(dataset)


def _inspect(path: Path, spec: DatasetUploadSpec, limits: ArchiveLimits) -> DatasetInspection:
    return inspect_dataset(path, spec.key, limits, spec.labels_key)


@router.get("", response_model=DatasetList, responses=problem_responses(401, 422, 503))
def list_datasets(
    tenant: TenantDep,
    session: SessionDep,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    page_token: PageTokenQuery = None,
) -> DatasetList:
    return rules.dataset_page(session, tenant, page_size, page_token)


@router.get(
    "/{dataset_id}",
    response_model=DatasetResource,
    responses=problem_responses(401, 404, 503),
)
def read_dataset(dataset_id: str, tenant: TenantDep, session: SessionDep) -> DatasetResource:
    dataset = rules.get_owned_dataset(session, tenant, dataset_id)
    if dataset is None:
        raise NotFound(f"No dataset {dataset_id!r}.")
    return rules.dataset_resource(dataset)
