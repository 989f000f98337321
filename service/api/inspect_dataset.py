"""What an uploaded dataset holds, read without unpickling anything (numpy, no torch).

`.npy` and `.npz` are read with `allow_pickle=False`; the array of images must be
[N, C, H, W] (or [N, H, W], one channel) of finite numbers. Other arrays in an `.npz` (masks,
matrices for operators) are recorded by name and shape.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from schemas.array_rules import dtype_problem, image_count_problem
from schemas.datasets import DatasetFormat
from schemas.model_spec import MAX_IMAGE_SIDE
from service.api.inspect_upload import ZIP_MAGIC, ArchiveLimits, inspect_zip
from service.api.problems import InvalidUpload

NPY_MAGIC = b"\x93NUMPY"
DEFAULT_LABELS = "labels"  # the array of class labels in an .npz, unless spec.labels_key says
MAX_CHANNELS = 16
FINITE_CHECK_CHUNK = 64  # images per isfinite pass, to bound memory on large uploads


@dataclass
class DatasetInspection:
    format: DatasetFormat
    images_key: str | None  # None for .npy
    shape: list[int]  # images as [N, C, H, W]
    arrays: dict[str, list[int]]
    # class labels of a classifier dataset: {"key", "count", "min", "max"}; None without labels
    labels: dict[str, Any] | None = None


def _check_dtype(name: str, array: np.ndarray) -> None:
    problem = dtype_problem(array.dtype)
    if problem is not None:
        raise InvalidUpload(f"array {name!r} {problem}")


def images_shape(name: str, array: np.ndarray) -> list[int]:
    """The images' shape as [N, C, H, W]; checks rank, sizes and that every value is finite."""
    _check_dtype(name, array)
    if array.ndim == 3:
        n, h, w = array.shape
        c = 1
    elif array.ndim == 4:
        n, c, h, w = array.shape
    else:
        raise InvalidUpload(
            f"array {name!r} has shape {list(array.shape)}; "
            "images must be [N, C, H, W] or [N, H, W]"
        )
    count_problem = image_count_problem(int(n))
    if count_problem is not None:
        raise InvalidUpload(f"array {name!r} {count_problem}")
    if not 1 <= c <= MAX_CHANNELS:
        raise InvalidUpload(f"array {name!r} has {c} channels; at most {MAX_CHANNELS}")
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise InvalidUpload(f"array {name!r}: height and width must be 1..{MAX_IMAGE_SIDE}")
    for start in range(0, n, FINITE_CHECK_CHUNK):
        if not np.isfinite(array[start : start + FINITE_CHECK_CHUNK]).all():
            raise InvalidUpload(f"array {name!r} contains NaN or infinite values")
    return [int(n), int(c), int(h), int(w)]


def _load_npy(path: Path) -> np.ndarray:
    try:
        # Memory-mapped: the finite check reads the file in slices, not all at once.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        # numpy refuses object arrays without allow_pickle with a ValueError.
        raise InvalidUpload(f"the .npy file cannot be read without unpickling ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InvalidUpload(f"the .npy file is damaged or truncated ({exc})") from None


def labels_summary(name: str, array: np.ndarray, count: int) -> dict[str, Any]:
    """Class labels: integers >= 0, one per image (their upper bound is checked against the
    model's num_classes when an audit is submitted)."""
    if array.dtype.hasobject or not np.issubdtype(array.dtype, np.integer):
        raise InvalidUpload(f"labels {name!r} have dtype {array.dtype}; use integer class indices")
    if array.ndim != 1 or array.shape[0] != count:
        raise InvalidUpload(
            f"labels {name!r} have shape {list(array.shape)}; expected [{count}], one per image"
        )
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise InvalidUpload(f"labels {name!r} must be class indices >= 0 (found {low})")
    return {"key": name, "count": count, "min": low, "max": high}


def _inspect_npz(
    path: Path, key: str | None, entries: list[zipfile.ZipInfo], labels_key: str | None = None
) -> DatasetInspection:
    for entry in entries:
        if not entry.filename.endswith(".npy") or "/" in entry.filename:
            raise InvalidUpload(f"entry {entry.filename!r} is not an array of an .npz file")
    arrays: dict[str, list[int]] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            images_key = key if key is not None else names[0]
            if images_key not in names:
                raise InvalidUpload(
                    f"the .npz has no array {images_key!r} (it has: {', '.join(names)})",
                )
            if labels_key is not None and labels_key not in names:
                raise InvalidUpload(
                    f"the .npz has no labels array {labels_key!r} (it has: {', '.join(names)})"
                )
            label_name = labels_key or (DEFAULT_LABELS if DEFAULT_LABELS in names else None)
            shape: list[int] = []
            for name in names:
                array = npz[name]
                if name == images_key:
                    shape = images_shape(name, array)
                else:
                    _check_dtype(name, array)
                arrays[name] = [int(d) for d in array.shape]
            labels = None
            if label_name is not None and label_name != images_key:
                labels = labels_summary(label_name, npz[label_name], shape[0])
    except InvalidUpload:
        raise
    except ValueError as exc:
        raise InvalidUpload(f"the .npz cannot be read without unpickling ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidUpload(f"the .npz is damaged or truncated ({exc})") from None
    return DatasetInspection("npz", images_key, shape, arrays, labels)


def inspect_dataset(
    path: Path, key: str | None, limits: ArchiveLimits, labels_key: str | None = None
) -> DatasetInspection:
    with open(path, "rb") as f:
        head = f.read(6)
    if head == NPY_MAGIC:
        if key is not None:
            raise InvalidUpload("spec.key names an array inside an .npz; this is an .npy file")
        array = _load_npy(path)
        shape = images_shape("images", array)
        return DatasetInspection("npy", None, shape, {"images": [int(d) for d in array.shape]})
    if head[:4] == ZIP_MAGIC:
        entries = inspect_zip(path, limits)
        if all(entry.filename.lower().endswith(".png") for entry in entries):
            raise InvalidUpload(
                "zips of PNG images are not accepted yet: convert them to an .npy array "
                "of shape [N, C, H, W] (numpy.stack of the images) and upload that"
            )
        return _inspect_npz(path, key, entries, labels_key)
    raise InvalidUpload("not a dataset this service reads: upload an .npy or .npz file")
