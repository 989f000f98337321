"""What an uploaded archive or array must be, stated once (numpy and the standard library only,
no torch: the gateway imports it).

The gateway applies these rules when a model or dataset is uploaded (service.api.inspect_upload,
service.api.inspect_dataset) and the engine applies them again when the sandboxed runner reads
the same file (workers.engine.screening, workers.shared.arrays), with the same `ArchiveLimits`:
the gateway takes them from its settings, and the worker copies its settings' limits into the
job it hands the runner (schemas.runner.RunnerRequest.archive_limits). So an upload the gateway
accepts is never refused by an audit for a reason these rules state, and a file that reaches the
engine another way (the local CLI) meets the same checks.

Every refusal is an `InputRefused` whose `reason` says what is wrong; the gateway turns it into
its 422 `invalid-upload` problem, the engine into `ModelRejected` or `EngineInputError`.
Archives are judged from their zip central directory, never extracted.
"""

from __future__ import annotations

import json
import re
import stat
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from schemas.array_rules import dtype_problem, image_count_problem
from schemas.model_spec import MAX_IMAGE_SIDE

ZIP_MAGIC = b"PK\x03\x04"
NPY_MAGIC = b"\x93NUMPY"

# An entry is held to max_compression_ratio only from this size on. An entry declares its
# expanded size in the central directory and zip readers (Python's zipfile, hence numpy, and
# torch's) stop there, so a smaller entry can never expand past 1 MiB whatever its ratio; the
# sum over all entries is bounded by max_uncompressed_bytes. Below it, legitimate entries
# compress far better than 200-fold: a 256x256 float32 sampling mask in np.savez_compressed is
# about 250-fold, TorchScript source and JSON often more.
RATIO_CHECKED_FROM_BYTES = 1024**2

# Native or GPU code in any platform's spelling, versioned sonames included (libx.so.1.2):
# shared libraries, executables, object files and static libraries, CUDA/ROCm/SPIR-V kernels.
NATIVE_CODE = re.compile(
    r"\.(so(\.\d+)*|dll|dylib|pyd|exe|o|a|lib|cubin|fatbin|ptx|hsaco|spv)$", re.IGNORECASE
)

# The entries each PyTorch archive format writes, below the archive's single top-level folder.
TORCHSCRIPT_ENTRIES = re.compile(
    r"^(data\.pkl|constants\.pkl|version|byteorder|\.data/version|\.data/serialization_id"
    r"|data/\d+|constants/\d+|code/[\w./-]+\.(py|debug_pkl)|extra/[\w.-]+"
    # torch.jit.trace keeps its example inputs (tensors, read by the same restricted unpickler)
    r"|traced_inputs\.pkl|traced_inputs/\d+)$"
)
EXPORT_ENTRIES = re.compile(
    r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json|data/weights/[\w.-]+|data/constants/[\w.-]+"
    r"|data/sample_inputs/[\w.-]+\.pt|extra/[\w.-]+)$"
)

MAX_CHANNELS = 16  # channels of a dataset's images (as a ModelSpec's image_shape allows)
FINITE_CHECK_CHUNK = 1024 * 1024  # values per isfinite pass, to bound memory on large arrays
DEFAULT_LABELS_KEY = "labels"  # the class labels in an .npz unless the dataset names another


class InputRefused(ValueError):
    """An archive or array these rules refuse; `reason` is a sentence a person can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ArchiveLimits(BaseModel):
    """The limits on a zip archive (a TorchScript or `.pt2` model, an `.npz` dataset). The
    defaults are the settings' defaults (TIGHTROPE_MAX_ARCHIVE_ENTRIES,
    TIGHTROPE_MAX_ARCHIVE_UNCOMPRESSED_BYTES, TIGHTROPE_MAX_COMPRESSION_RATIO)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_entries: int = Field(default=10_000, ge=1)
    max_uncompressed_bytes: int = Field(default=2 * 1024**3, ge=1)
    max_compression_ratio: float = Field(default=200.0, ge=1.0)


DEFAULT_ARCHIVE_LIMITS = ArchiveLimits()


# ---------------------------------------------------------------------------------------------
# Zip archives
# ---------------------------------------------------------------------------------------------


def entry_name_problem(name: str) -> str | None:
    """Why an entry name could point outside the archive's folder, or None."""
    if "\x00" in name:
        return "an archive entry name contains a NUL byte"
    if "\\" in name:
        return f"archive entry {name!r} contains a backslash (a Windows path)"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return f"archive entry {name!r} is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return f"archive entry {name!r} climbs out of the archive ('..')"
    return None


def inspect_zip(path: Path, limits: ArchiveLimits) -> list[zipfile.ZipInfo]:
    """The archive's entries after every check that needs no extraction: readable, not empty,
    at most `max_entries`, safe names, no symbolic links, no native code, every entry inside
    the file, at most `max_uncompressed_bytes` in all, no entry of RATIO_CHECKED_FROM_BYTES or
    more expanding over `max_compression_ratio`-fold."""
    file_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise InputRefused(f"the zip archive is damaged or truncated ({exc})") from None
    except (OSError, ValueError, EOFError) as exc:
        raise InputRefused(f"the zip archive cannot be read ({exc})") from None
    if not entries:
        raise InputRefused("the zip archive is empty")
    if len(entries) > limits.max_entries:
        raise InputRefused(f"the archive has {len(entries)} entries; at most {limits.max_entries}")
    total = 0
    for entry in entries:
        name = entry.filename
        problem = entry_name_problem(name)
        if problem is not None:
            raise InputRefused(problem)
        if stat.S_ISLNK(entry.external_attr >> 16):
            raise InputRefused(f"archive entry {name!r} is a symbolic link")
        if NATIVE_CODE.search(name):
            raise InputRefused(f"archive entry {name!r} is a native library or binary code")
        if entry.header_offset + entry.compress_size > file_size:
            raise InputRefused(f"archive entry {name!r} lies past the end of the file (truncated)")
        total += entry.file_size
        if total > limits.max_uncompressed_bytes:
            raise InputRefused(
                f"the archive would expand past {limits.max_uncompressed_bytes} bytes"
            )
        ratio = entry.file_size / max(entry.compress_size, 1)
        if entry.file_size >= RATIO_CHECKED_FROM_BYTES and ratio > limits.max_compression_ratio:
            raise InputRefused(
                f"archive entry {name!r} expands {ratio:.0f}-fold "
                f"(at most {limits.max_compression_ratio:.0f}): a compression bomb"
            )
    return entries


def relative_name(name: str) -> str:
    """An entry's name below the archive's top-level folder (`model/code/x.py` -> `code/x.py`)."""
    return name.split("/", 1)[1] if "/" in name else name


def archive_root(entries: Iterable[zipfile.ZipInfo]) -> str:
    """The single top-level folder a PyTorch archive keeps all its entries under."""
    names = [entry.filename for entry in entries]
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or all("/" not in name for name in names):
        raise InputRefused("a PyTorch archive keeps all its entries under one top-level folder")
    return roots.pop()


def zip_model_format(names: Iterable[str]) -> Literal["torchscript", "export"] | None:
    """The PyTorch archive format its entry names show, or None (a checkpoint, another zip)."""
    relative = {relative_name(name) for name in names}
    if "archive_format" in relative:
        return "export"
    if "constants.pkl" in relative and any(name.startswith("code/") for name in relative):
        return "torchscript"
    return None


# How each PyTorch archive format is named in a refusal (the gateway's and the engine's).
ARCHIVE_FORMAT_NAMES: dict[str, str] = {
    "torchscript": "a TorchScript archive",
    "export": "a torch.export .pt2 archive",
}


def check_model_entries(
    entries: Iterable[zipfile.ZipInfo], fmt: Literal["torchscript", "export"]
) -> None:
    """Every entry (below the root) is one the format writes."""
    allowed = TORCHSCRIPT_ENTRIES if fmt == "torchscript" else EXPORT_ENTRIES
    for entry in entries:
        if not entry.is_dir() and not allowed.match(relative_name(entry.filename)):
            raise InputRefused(
                f"archive entry {entry.filename!r} is not part of {ARCHIVE_FORMAT_NAMES[fmt]}"
            )


# Calls in serialised TorchScript source refused before the archive is deserialised (a
# `__setstate__` runs at load time): file operations, output, custom operator namespaces.
FORBIDDEN_TORCHSCRIPT_SOURCE = re.compile(
    r"\b(torch\.(from_file|save|_print)|print)\s*\(|(?<![\w.])ops\.(\w+)\."
)
TENSOR_OPERATOR_NAMESPACES = frozenset({"aten", "prim"})


def check_torchscript_source(archive: zipfile.ZipFile, entries: Iterable[zipfile.ZipInfo]) -> None:
    """No `code/` source of a TorchScript archive names a file operation, output or a custom
    operator (read as text: `inspect_zip` has bounded the sizes)."""
    for entry in entries:
        if not entry.filename.endswith(".py"):
            continue
        source = archive.read(entry).decode("utf-8", errors="replace")
        for match in FORBIDDEN_TORCHSCRIPT_SOURCE.finditer(source):
            if match.group(3) in TENSOR_OPERATOR_NAMESPACES:
                continue
            raise InputRefused(
                f"the TorchScript source {entry.filename!r} calls {match.group(0).rstrip('(. ')}, "
                "which is not allowed (file, output or custom operations)"
            )


def check_export_archive(archive: zipfile.ZipFile, entries: Iterable[zipfile.ZipInfo]) -> None:
    """A `.pt2` archive says it is one, holds an exported program, and no payload that
    `torch.export.load` would unpickle: weights and constants are plain tensors. (Sample inputs
    are tensors read with torch's weights-only unpickler: the engine checks those, with torch.)"""
    by_relative = {relative_name(entry.filename): entry for entry in entries}
    marker = by_relative.get("archive_format")
    if marker is None or archive.read(marker).strip() != b"pt2":
        raise InputRefused("the .pt2 archive's archive_format is not 'pt2'")
    if not any(relative.startswith("models/") for relative in by_relative):
        raise InputRefused("the .pt2 archive holds no exported program (models/*.json)")
    for relative, entry in by_relative.items():
        if relative.startswith("data/") and relative.endswith("_config.json"):
            _check_payload_config(relative, archive.read(entry))


def _check_payload_config(relative: str, raw: bytes) -> None:
    try:
        config = json.loads(raw)["config"]
        payloads = list(config.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputRefused(f"the .pt2 payload configuration {relative!r} is malformed") from None
    for name, meta in payloads:
        if not isinstance(meta, dict):
            raise InputRefused(f"the .pt2 payload configuration {relative!r} is malformed")
        if meta.get("use_pickle"):
            raise InputRefused(f"the .pt2 payload {name!r} is pickled, which is not accepted")
        path_name = str(meta.get("path_name", ""))
        if relative.startswith("data/constants/") and not path_name.startswith("tensor_"):
            raise InputRefused(
                f"the .pt2 constant {name!r} is a serialised object ({path_name}), not a tensor"
            )


def check_model_contents(path: Path, entries: list[zipfile.ZipInfo], fmt: str) -> None:
    """What a PyTorch archive's entries say, beyond their names: the source of a TorchScript
    archive, the payload configuration of a `.pt2` one."""
    with zipfile.ZipFile(path) as archive:
        if fmt == "torchscript":
            check_torchscript_source(archive, entries)
        elif fmt == "export":
            check_export_archive(archive, entries)


def check_npz_entries(entries: Iterable[zipfile.ZipInfo]) -> None:
    """An `.npz` holds `<name>.npy` arrays at its top level and nothing else."""
    for entry in entries:
        if not entry.filename.endswith(".npy") or "/" in entry.filename:
            raise InputRefused(f"entry {entry.filename!r} is not an array of an .npz file")


# ---------------------------------------------------------------------------------------------
# Arrays (.npy files and the members of .npz archives), never unpickled
# ---------------------------------------------------------------------------------------------


def _unpickling(what: str, exc: Exception) -> InputRefused:
    # numpy refuses object arrays without allow_pickle with a ValueError
    return InputRefused(
        f"{what} is not a plain numeric array: it cannot be read without unpickling ({exc})"
    )


def read_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """The array of an `.npy` file; memory-mapped unless `mmap` is False (the checks then read
    it in slices)."""
    try:
        loaded = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        raise _unpickling("the .npy file", exc) from None
    except (OSError, EOFError) as exc:
        raise InputRefused(f"the .npy file is damaged or truncated ({exc})") from None
    if not isinstance(loaded, np.ndarray):
        raise InputRefused("the file is not an .npy array")
    return loaded


@contextmanager
def open_npz(path: Path, limits: ArchiveLimits) -> Iterator[Any]:
    """An `.npz` archive (numpy's NpzFile), after `inspect_zip` and `check_npz_entries`; read its
    arrays with `npz_array`."""
    check_npz_entries(inspect_zip(path, limits))
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise _unpickling("the .npz", exc) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputRefused(f"the .npz is damaged or truncated ({exc})") from None
    with npz:
        if not npz.files:
            raise InputRefused("the .npz holds no array")
        yield npz


def npz_array(npz: Any, name: str) -> np.ndarray:
    """Array `name` of an archive from `open_npz`."""
    if name not in npz.files:
        raise InputRefused(f"the .npz has no array {name!r} (it has: {', '.join(npz.files)})")
    try:
        array: np.ndarray = npz[name]
    except ValueError as exc:
        raise _unpickling(f"array {name!r}", exc) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputRefused(f"array {name!r} of the .npz is damaged or truncated ({exc})") from None
    return array


def check_array(name: str, array: np.ndarray, finite: bool = True) -> None:
    """A plain real-valued array (schemas.array_rules.dtype_problem) and, with `finite`, no NaN
    or infinite value (checked in slices: a memory-mapped array is never read whole)."""
    problem = dtype_problem(array.dtype)
    if problem is not None:
        raise InputRefused(f"array {name!r} {problem}")
    if finite and np.issubdtype(array.dtype, np.inexact) and not _all_finite(array):
        raise InputRefused(f"array {name!r} contains NaN or infinite values")


def _all_finite(array: np.ndarray) -> bool:
    if array.ndim == 0 or array.shape[0] == 0:
        return bool(np.isfinite(array).all())
    rows = max(1, FINITE_CHECK_CHUNK // max(1, array.size // array.shape[0]))
    return all(
        np.isfinite(array[start : start + rows]).all() for start in range(0, array.shape[0], rows)
    )


def images_shape(name: str, array: np.ndarray) -> list[int]:
    """Images of a dataset as [N, C, H, W] ([N, H, W] is one channel): a plain real-valued
    array, 1 to MAX_IMAGES images, 1 to MAX_CHANNELS channels, sides of 1 to MAX_IMAGE_SIDE,
    every value finite."""
    check_array(name, array, finite=False)
    if array.ndim == 3:
        n, h, w = array.shape
        c = 1
    elif array.ndim == 4:
        n, c, h, w = array.shape
    else:
        raise InputRefused(
            f"array {name!r} has shape {list(array.shape)}; "
            "images must be [N, C, H, W] or [N, H, W]"
        )
    count_problem = image_count_problem(int(n))
    if count_problem is not None:
        raise InputRefused(f"array {name!r} {count_problem}")
    if not 1 <= c <= MAX_CHANNELS:
        raise InputRefused(f"array {name!r} has {c} channels; at most {MAX_CHANNELS}")
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise InputRefused(f"array {name!r}: height and width must be 1..{MAX_IMAGE_SIDE}")
    check_array(name, array)
    return [int(n), int(c), int(h), int(w)]


def labels_summary(name: str, array: np.ndarray, count: int) -> dict[str, Any]:
    """Class labels: a 1-D integer array, one label >= 0 per image (their upper bound is the
    model's num_classes, checked when an audit is submitted and again when it runs)."""
    if array.dtype.hasobject or not np.issubdtype(array.dtype, np.integer) or array.ndim != 1:
        raise InputRefused(
            f"labels {name!r} must be a 1-D integer array of class indices, not {array.dtype} "
            f"of shape {list(array.shape)}"
        )
    if array.shape[0] != count:
        raise InputRefused(
            f"labels {name!r}: {array.shape[0]} labels for {count} images; one per image"
        )
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise InputRefused(f"labels {name!r} must be class indices >= 0 (found {low})")
    return {"key": name, "count": count, "min": low, "max": high}
