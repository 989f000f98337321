"""Reading `.npy`/`.npz` arrays named in an audit config, without ever unpickling."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas.array_rules import dtype_problem
from schemas.common import FileArray, UploadedArray
from workers.engine.errors import EngineInputError


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
) -> np.ndarray:
    """The array in an `.npy` file, or `key` (default: the first array) of an `.npz` file.

    Raises EngineInputError for anything but a plain real-valued array: pickles, objects,
    complex numbers, NaN or infinite values (unless `allow_non_finite`), and more than
    `max_elements` values (an `.npy` is then memory-mapped: only its header is read)."""
    path = resolve_path(str(file), base_dir)
    if path.suffix not in (".npy", ".npz"):
        raise EngineInputError(f"{file}: only .npy and .npz files are accepted")
    if not path.is_file():
        raise EngineInputError(f"{file}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode=None if max_elements is None else "r")
    except ValueError as exc:  # pickled object arrays end up here
        raise EngineInputError(f"{file}: not a plain numeric array ({exc})") from None
    except OSError as exc:
        raise EngineInputError(f"{file}: cannot be read as an array ({exc})") from None
    if isinstance(loaded, np.ndarray):
        array = loaded
    else:
        with loaded:
            names = list(loaded.files)
            if not names:
                raise EngineInputError(f"{file}: the archive holds no array")
            chosen = key if key is not None else names[0]
            if chosen not in names:
                raise EngineInputError(f"{file}: no array {chosen!r} (arrays: {', '.join(names)})")
            try:
                array = loaded[chosen]
            except ValueError as exc:
                raise EngineInputError(f"{file}: not a plain numeric array ({exc})") from None
    if max_elements is not None and array.size > max_elements:
        raise EngineInputError(f"{file}: {array.size} values, more than {max_elements}")
    problem = dtype_problem(array.dtype)
    if problem is not None:
        raise EngineInputError(f"{file}: the array {problem}")
    if not allow_non_finite and not np.all(np.isfinite(array)):
        raise EngineInputError(f"{file}: the array holds NaN or infinite values")
    return array


def load_array_ref(ref: FileArray | UploadedArray, base_dir: Path | None) -> np.ndarray:
    if isinstance(ref, UploadedArray):
        # the task rewrites uploads to files in the job directory before the engine runs
        raise EngineInputError(
            f"uploaded array {ref.dataset_id!r} was not resolved to a file before the audit"
        )
    return load_array(ref.file, ref.key, base_dir)
