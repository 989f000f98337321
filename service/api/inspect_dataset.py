"""What an uploaded dataset holds, read without unpickling anything (numpy, no torch).

`.npy` and `.npz` are read with `allow_pickle=False` and held to schemas.archive_rules, the
rules the engine applies again when an audit reads the file: the array of images must be
[N, C, H, W] (or [N, H, W], one channel) of finite numbers; every other array in an `.npz`
(masks, matrices for operators) must be plain and finite too, and is recorded by name and shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.archive_rules import (
    DEFAULT_LABELS_KEY,
    NPY_MAGIC,
    ZIP_MAGIC,
    ArchiveLimits,
    InputRefused,
    check_array,
    images_shape,
    inspect_zip,
    labels_summary,
    npz_array,
    open_npz,
    read_npy,
)
from schemas.datasets import DatasetFormat
from service.domain.errors import InvalidUpload


@dataclass
class DatasetInspection:
    format: DatasetFormat
    images_key: str | None  # None for .npy
    shape: list[int]  # images as [N, C, H, W]
    arrays: dict[str, list[int]]
    # class labels of a classifier dataset: {"key", "count", "min", "max"}; None without labels
    labels: dict[str, Any] | None = None


@contextmanager
def _as_invalid_upload() -> Iterator[None]:
    """A refusal of schemas.archive_rules (the engine's rules too) as a 422 problem."""
    try:
        yield
    except InputRefused as exc:
        raise InvalidUpload(exc.reason) from None


def _inspect_npz(
    path: Path, key: str | None, limits: ArchiveLimits, labels_key: str | None = None
) -> DatasetInspection:
    """Every array must be plain and finite (any may be an operator's mask or matrix); the
    images those of schemas.archive_rules.images_shape; labels, if any, one class per image."""
    arrays: dict[str, list[int]] = {}
    with open_npz(path, limits) as npz:
        names = list(npz.files)
        images_key = key if key is not None else names[0]
        if images_key not in names:
            raise InvalidUpload(
                f"the .npz has no array {images_key!r} (it has: {', '.join(names)})"
            )
        if labels_key is not None and labels_key not in names:
            raise InvalidUpload(
                f"the .npz has no labels array {labels_key!r} (it has: {', '.join(names)})"
            )
        label_name = labels_key or (DEFAULT_LABELS_KEY if DEFAULT_LABELS_KEY in names else None)
        shape: list[int] = []
        for name in names:
            array = npz_array(npz, name)
            if name == images_key:
                shape = images_shape(name, array)
            else:
                check_array(name, array)
            arrays[name] = [int(d) for d in array.shape]
        labels = None
        if label_name is not None and label_name != images_key:
            labels = labels_summary(label_name, npz_array(npz, label_name), shape[0])
    return DatasetInspection("npz", images_key, shape, arrays, labels)


def inspect_dataset(
    path: Path, key: str | None, limits: ArchiveLimits, labels_key: str | None = None
) -> DatasetInspection:
    with open(path, "rb") as f:
        head = f.read(6)
    if head == NPY_MAGIC:
        if key is not None:
            raise InvalidUpload("spec.key names an array inside an .npz; this is an .npy file")
        with _as_invalid_upload():
            array = read_npy(path)
            shape = images_shape("images", array)
        return DatasetInspection("npy", None, shape, {"images": [int(d) for d in array.shape]})
    if head[:4] == ZIP_MAGIC:
        with _as_invalid_upload():
            entries = inspect_zip(path, limits)
            if all(entry.filename.lower().endswith(".png") for entry in entries):
                raise InvalidUpload(
                    "zips of PNG images are not accepted yet: convert them to an .npy array "
                    "of shape [N, C, H, W] (numpy.stack of the images) and upload that"
                )
            return _inspect_npz(path, key, limits, labels_key)
    raise InvalidUpload("not a dataset this service reads: upload an .npy or .npz file")
