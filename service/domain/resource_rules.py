"""The rules of models and datasets: the rows an upload makes, the tenant's own rows, their API
view, and a page of them.

An upload reaches them already received and inspected by the HTTP layer (service.api.uploads,
service.api.inspect_upload, service.api.inspect_dataset); the rules read only what the protocols
below name of it, and import nothing of that layer."""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.datasets import DatasetFormat, DatasetUploadSpec
from schemas.endpoints import (
    ENDPOINT_FORMAT,
    EndpointRegistration,
    EndpointView,
    endpoint_identity,
)
from schemas.model_spec import ModelFormat, ModelSpec
from schemas.resources import DatasetList, DatasetResource, ModelList, ModelResource
from service.db.tables import Dataset, Model, Tenant, new_id, utcnow
from service.domain.errors import NotFound
from service.domain.pagination import paginate, split_page
from service.settings import Settings
from service.signing import endpoint_secrets


class ReceivedFile(Protocol):
    """An uploaded file, received and hashed (service.api.uploads.StagedUpload)."""

    @property
    def sha256(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def filename(self) -> str | None: ...


class InspectedModel(Protocol):
    """What the inspection of an uploaded model found (service.api.inspect_upload)."""

    @property
    def format(self) -> ModelFormat: ...

    @property
    def info(self) -> dict[str, Any]: ...


class InspectedDataset(Protocol):
    """What the inspection of an uploaded dataset found (service.api.inspect_dataset)."""

    @property
    def format(self) -> DatasetFormat: ...

    @property
    def images_key(self) -> str | None: ...

    @property
    def shape(self) -> list[int]: ...

    @property
    def arrays(self) -> dict[str, list[int]]: ...

    @property
    def labels(self) -> dict[str, Any] | None: ...


def _upload_fields(row: Model | Dataset) -> dict[str, Any]:
    """What every uploaded resource says of itself: its id and name, its file, when it came."""
    return {
        "id": row.id,
        "name": row.name,
        "format": row.format,
        "sha256": row.sha256,
        "size_bytes": row.size_bytes,
        "created_at": row.created_at,
    }


def model_resource(model: Model) -> ModelResource:
    info = model.admission_info or {}
    stochastic = info.get("stochastic")
    spread = info.get("output_spread")
    return ModelResource(
        **_upload_fields(model),
        status=model.status,
        reason=model.reason,
        spec=ModelSpec.model_validate(model.spec),
        endpoint=None if model.endpoint is None else EndpointView.model_validate(model.endpoint),
        stochastic=stochastic if isinstance(stochastic, bool) else None,
        output_spread=float(spread) if isinstance(spread, int | float) else None,
        updated_at=model.updated_at,
    )


def dataset_resource(dataset: Dataset) -> DatasetResource:
    return DatasetResource(
        **_upload_fields(dataset),
        shape=dataset.shape["images"],
        arrays=dataset.shape["arrays"],
        labels=dataset.shape.get("labels"),
    )


def new_model(
    tenant: Tenant, spec: ModelSpec, inspection: InspectedModel, staged: ReceivedFile
) -> Model:
    """The `validating` row of an uploaded model, for a worker to admit."""
    return Model(
        tenant_id=tenant.id,
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        format=inspection.format,
        sha256=staged.sha256,
        size_bytes=staged.size,
        status="validating",
        admission_info={"upload": inspection.info, "filename": staged.filename},
    )


def new_endpoint_model(
    tenant: Tenant, registration: EndpointRegistration, settings: Settings
) -> Model:
    """The `validating` row of a registered endpoint, for a worker to probe; its auth secret
    encrypted (bound to the row's id), never kept in the clear."""
    model_id = new_id("mdl")
    secret = None
    if registration.auth is not None:
        value = registration.auth.secret.get_secret_value()
        secret = endpoint_secrets.encrypt(settings, model_id, value)
    return Model(
        id=model_id,
        tenant_id=tenant.id,
        name=registration.spec.name,
        spec=registration.spec.model_dump(mode="json"),
        format=ENDPOINT_FORMAT,
        sha256=endpoint_identity(registration),
        size_bytes=0,
        status="validating",
        endpoint=registration.public().model_dump(mode="json"),
        endpoint_secret=secret,
        admission_info={},
    )


def new_dataset(
    tenant: Tenant, spec: DatasetUploadSpec, inspection: InspectedDataset, staged: ReceivedFile
) -> Dataset:
    """The row of an uploaded dataset."""
    spec_json = spec.model_dump(mode="json")
    # The images array actually used, so workers need not guess the .npz's first array.
    spec_json["key"] = inspection.images_key
    return Dataset(
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


def get_owned_model(session: Session, tenant: Tenant, model_id: str) -> Model:
    """A live model of this tenant; another tenant's model is as unknown as a missing one."""
    model = session.get(Model, model_id)
    if model is None or model.tenant_id != tenant.id or model.deleted_at is not None:
        raise NotFound(f"No model {model_id!r}.")
    return model


def delete_owned_model(session: Session, tenant: Tenant, model_id: str) -> None:
    """Soft delete: the row stays for the audits that name it; the model is gone for clients."""
    model = get_owned_model(session, tenant, model_id)
    model.deleted_at = utcnow()
    session.commit()


def get_owned_dataset(session: Session, tenant: Tenant, dataset_id: str) -> Dataset | None:
    """A live dataset of this tenant, or None (the callers word the refusal: a 404 for the
    dataset's own route, a 422 naming the field for an audit request)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant.id or dataset.deleted_at is not None:
        return None
    return dataset


def model_page(
    session: Session,
    tenant: Tenant,
    page_size: int,
    page_token: str | None,
    sha256: str | None = None,
) -> ModelList:
    """A page of the tenant's live models, newest first; only those of `sha256` if given."""
    query = select(Model).where(Model.tenant_id == tenant.id, Model.deleted_at.is_(None))
    if sha256 is not None:
        query = query.where(Model.sha256 == sha256)
    query = paginate(query, Model.created_at, Model.id, page_token, page_size)
    rows, next_token = split_page(list(session.scalars(query)), page_size)
    return ModelList(items=[model_resource(m) for m in rows], next_page_token=next_token)


def dataset_page(
    session: Session, tenant: Tenant, page_size: int, page_token: str | None
) -> DatasetList:
    """A page of the tenant's live datasets, newest first."""
    query = select(Dataset).where(Dataset.tenant_id == tenant.id, Dataset.deleted_at.is_(None))
    query = paginate(query, Dataset.created_at, Dataset.id, page_token, page_size)
    rows, next_token = split_page(list(session.scalars(query)), page_size)
    return DatasetList(items=[dataset_resource(d) for d in rows], next_page_token=next_token)
