"""Datasets: built-in phantoms generated on the fly, uploads, and local files (CLI only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.array_rules import MAX_IMAGES
from schemas.common import MAX_SEED, StrictModel

DatasetFormat = Literal["npy", "npz", "png_zip"]
DIGIT_CLASSES = 10  # the built-in `digits`: classes 0-9


class BuiltinDataset(StrictModel):
    builtin: Literal["ellipses", "shepp_logan", "digits"] = Field(
        description="digits: labelled digits 0-9 rendered from the DejaVu font (classifiers)"
    )
    count: int = Field(default=4, ge=1, le=MAX_IMAGES)
    size: int = Field(default=64, ge=8, le=1024)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


class UploadedDataset(StrictModel):
    dataset_id: str = Field(min_length=1, max_length=64)


class FileDataset(StrictModel):
    """Local `.npy`/`.npz` ([N, C, H, W]); the local CLI only."""

    file: str = Field(min_length=1, max_length=4096)
    key: str | None = None
    labels_key: str | None = Field(
        default=None, description="Integer class labels [N] in the .npz; default: `labels`"
    )


DatasetRef = BuiltinDataset | UploadedDataset | FileDataset


class DatasetUploadSpec(StrictModel):
    """`spec` of `POST /v1/datasets`."""

    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    key: str | None = Field(default=None, description="Array of images inside an .npz")
    labels_key: str | None = Field(
        default=None,
        description="Integer class labels [N] inside an .npz (classifier audits); "
        "default: the array `labels` when there is one",
    )
