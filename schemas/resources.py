"""API views of stored models and datasets."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from schemas.datasets import DatasetFormat
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
    format: ModelFormat
    sha256: str
    size_bytes: int
    spec: ModelSpec
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
