"""Reading `.npy`/`.npz` arrays named in an audit config, without ever unpickling, by the rules
of schemas.archive_rules (the gateway's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas.archive_rules import (
    ZIP_MAGIC,
    ArchiveLimits,
    InputRefused,
    check_array,
    images_shape,
    npz_array,
    open_npz,
    read_npy,
)
from schemas.common import FileArray, UploadedArray
from workers.shared.errors import EngineInputError
from workers.shared.limits import archive_limits


def resolve_path(file: str, base_dir: Path | None) -> Path:
    path = Path(file)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def load_array(
    file: str | Path,
    key: str | None = None,
    base_dir: Path | None = None,
    *,
    max_elements: int | None = None,
    allow_non_finite: bool = False,
    images: bool = False,
    limits: ArchiveLimits | None = None,
) -> np.ndarray:
    """The array in an `.npy` file, or `key` (default: the first array) of an `.npz` file.

    Held to schemas.archive_rules, the rules the gateway applied at upload: an `.npz` passes
    the archive checks with `limits` (by default those in force: workers.shared.limits) and
    holds only arrays; the array is plain and real-valued (no pickles, objects or complex
    numbers) and finite (unless `allow_non_finite`); with `images`, it is a dataset's images
    (schemas.archive_rules.images_shape). Raises EngineInputError, naming the file. With
    `max_elements`, more values are refused (an `.npy` is then memory-mapped: only its header
    is read)."""
    path = resolve_path(str(file), base_dir)
    if path.suffix not in (".npy", ".npz"):
        raise EngineInputError(f"{file}: only .npy and .npz files are accepted")
    if not path.is_file():
        raise EngineInputError(f"{file}: no such file")
    try:
        with path.open("rb") as f:
            is_zip = f.read(4) == ZIP_MAGIC
        if is_zip:
            with open_npz(path, limits or archive_limits()) as npz:
                name = key if key is not None else npz.files[0]
                array = npz_array(npz, name)
        else:
            name = path.name
            array = read_npy(path, mmap=max_elements is not None)
        if max_elements is not None and array.size > max_elements:
            raise EngineInputError(f"{file}: {array.size} values, more than {max_elements}")
        if images:
            images_shape(name, array)
        else:
            check_array(name, array, finite=not allow_non_finite)
    except InputRefused as exc:
        raise EngineInputError(f"{file}: {exc.reason}") from None
    return array


def load_array_ref(ref: FileArray | UploadedArray, base_dir: Path | None) -> np.ndarray:
    if isinstance(ref, UploadedArray):
        # the task rewrites uploads to files in the job directory before the engine runs
        raise EngineInputError(
            f"uploaded array {ref.dataset_id!r} was not resolved to a file before the audit"
        )
    return load_array(ref.file, ref.key, base_dir)
