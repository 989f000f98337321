"""API views of stored models and datasets."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.datasets import DatasetFormat
from schemas.endpoints import EndpointView
from schemas.model_spec import ModelFormat, ModelSpec, ModelStatus


class ModelResource(BaseModel):
    id: str
    name: str
    status: ModelStatus
    reason: str | None = Field(
        default=None,
        description="`rejected`: why. `validating`: why it is still waiting when a worker "
        "could not start its admission (e.g. no worker can sandbox models), else null",
    )
    format: ModelFormat | Literal["endpoint"] = Field(
        description="The uploaded file's format, or `endpoint`: a model audited through its "
        "inference endpoint (docs/models.md, 'Endpoint models')"
    )
    sha256: str = Field(
        description="The uploaded file's sha256; an endpoint model's: of its URL, name and "
        "version (schemas.endpoints.endpoint_identity)"
    )
    size_bytes: int
    spec: ModelSpec
    endpoint: EndpointView | None = Field(
        default=None, description="An endpoint model's endpoint and limits (never its secret)"
    )
    stochastic: bool | None = Field(
        default=None,
        description="Whether the model is a sampler: its admission probe ran it twice on the "
        "same input and the outputs differed by more than the tolerance (docs/models.md, "
        "'Stochastic models'); null until a probe measured it (validating, rejected before "
        "its probe, or a measurement model whose probe waits for its first audit)",
    )
    output_spread: float | None = Field(
        default=None,
        description="The probe's measure: the largest ‖Ψ₁(y) − Ψ₂(y)‖ / ‖Ψ₁(y)‖ over its "
        "inputs, two calls at the same input; 0 for a deterministic model on the CPU",
    )
    created_at: datetime
    updated_at: datetime


class ModelList(BaseModel):
    items: list[ModelResource]
    next_page_token: str | None = None


class DatasetResource(BaseModel):
    id: str
    name: str
    format: DatasetFormat
    sha256: str
    size_bytes: int
    shape: list[int]
    arrays: dict[str, list[int]]
    labels: dict[str, Any] | None = Field(
        default=None, description="Class labels found: {key, count, min, max} (classifiers)"
    )
    created_at: datetime


class DatasetList(BaseModel):
    items: list[DatasetResource]
    next_page_token: str | None = None
