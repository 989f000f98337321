"""One rule for archives and arrays (schemas.archive_rules): the gateway's upload inspection and
the engine's reading refuse the same files and accept the same files, with the limits that
travel from the settings to the runner in job.json."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from schemas.archive_rules import (
    DEFAULT_ARCHIVE_LIMITS,
    RATIO_CHECKED_FROM_BYTES,
    ArchiveLimits,
    InputRefused,
    inspect_zip,
)
from schemas.datasets import FileDataset
from schemas.model_spec import ModelSpec
from schemas.runner import JOB_FILE, RunnerRequest
from service.api.inspect_dataset import inspect_dataset
from service.api.inspect_upload import inspect_model
from service.domain.errors import InvalidUpload
from service.settings import Settings
from service.storage.stores import BlobStore
from tests.fixtures import model_factory as mf
from workers.engine.ground_truth import load_images
from workers.engine.labelled import load_labelled
from workers.engine.rejection import ModelRejected
from workers.engine.screening import screen_archive
from workers.execution.job_dirs import materialise_admission_job
from workers.shared.arrays import load_array
from workers.shared.errors import EngineInputError
from workers.shared.limits import archive_limits, archive_limits_in_force

# Small limits, as a deployment might set them: the cases stay small and fast.
LIMITS = ArchiveLimits(max_entries=64, max_uncompressed_bytes=16 * 1024**2)
SPEC = ModelSpec.model_validate(mf.tiny_cnn_spec())
MiB = 1024**2


# ---------------------------------------------------------------------------------------------
# The two sides, each as it runs: the gateway's inspection and the engine under the job's limits
# ---------------------------------------------------------------------------------------------


def gateway_model(path: Path) -> str | None:
    """The gateway's refusal of an uploaded model, or None when it accepts it."""
    try:
        inspect_model(path, SPEC, LIMITS)
    except InvalidUpload as exc:
        return str(exc.detail)
    return None


def engine_model(path: Path, fmt: str) -> str | None:
    """The engine's refusal (layers 1 and 2, as admission and every audit run them)."""
    try:
        with archive_limits_in_force(LIMITS):
            screen_archive(path, fmt)  # type: ignore[arg-type]
    except ModelRejected as exc:
        return exc.reason
    return None


def gateway_dataset(path: Path, key: str | None = None) -> str | None:
    try:
        inspect_dataset(path, key, LIMITS)
    except InvalidUpload as exc:
        return str(exc.detail)
    return None


def engine_dataset(path: Path, key: str | None = None) -> str | None:
    """What some audit would refuse: the images (with their labels, if the file has any), or any
    other array of the file used as an operator's mask, matrix or kernel."""
    try:
        with archive_limits_in_force(LIMITS):
            if path.suffix == ".npy":
                load_images(FileDataset(file=str(path)))
                return None
            with np.load(path, allow_pickle=False) as npz:
                names = list(npz.files)
            images_key = key or names[0]
            if "labels" in names:
                load_labelled(FileDataset(file=str(path), key=images_key), None, 1000)
            else:
                load_images(FileDataset(file=str(path), key=images_key))
            for name in names:
                if name not in (images_key, "labels"):
                    load_array(path, name)
    except (EngineInputError, ValueError, OSError, zipfile.BadZipFile) as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _root(archive: Path) -> str:
    with zipfile.ZipFile(archive) as z:
        return z.namelist()[0].split("/")[0]


def _with_entry(name: str, data: bytes = b"\x7fELF", symlink: bool = False) -> Callable[..., Path]:
    def make(d: Path) -> Path:
        base = mf.tiny_cnn_torchscript(d / "base.pt")
        return mf.zip_with_entry(
            d / "m.pt", name.format(root=_root(base)), data, base=base, symlink=symlink
        )

    return make


def _many_entries(d: Path) -> Path:
    base = mf.tiny_cnn_torchscript(d / "base.pt")
    path = d / "m.pt"
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(path, "w") as out:
        for entry in src.infolist():
            out.writestr(entry, src.read(entry))
        for i in range(LIMITS.max_entries):
            out.writestr(f"{_root(base)}/extra/f{i}", b"x")
    return path


def _deflated_zeros(size: int) -> Callable[..., Path]:
    def make(d: Path) -> Path:
        base = mf.tiny_cnn_torchscript(d / "base.pt")
        path = d / "m.pt"
        with zipfile.ZipFile(base) as src, zipfile.ZipFile(path, "w") as out:
            for entry in src.infolist():
                out.writestr(entry, src.read(entry))
            out.writestr(f"{_root(base)}/extra/zeros", bytes(size), zipfile.ZIP_DEFLATED)
        return path

    return make


BAD_MODELS: dict[str, Callable[..., Path]] = {
    "traversal": _with_entry("../evil"),
    "absolute": _with_entry("/etc/evil"),
    "backslash": _with_entry("{root}\\evil"),
    "symlink": _with_entry("{root}/data/link", b"/etc/passwd", symlink=True),
    "shared library": _with_entry("{root}/extra/libevil.so.1"),
    "gpu kernel": _with_entry("{root}/extra/kernel.cubin"),
    "dll": _with_entry("{root}/extra/evil.dll"),
    "entry of no format": _with_entry("{root}/payload.pkl"),
    "second root": _with_entry("other/data/0"),
    "too many entries": _many_entries,
    "bomb (ratio)": lambda d: _bomb(d, 8 * MiB),  # under the total, ~1000-fold
    "bomb (total)": lambda d: _bomb(d, 24 * MiB),  # past the total
    "truncated": lambda d: mf.truncated_copy(mf.tiny_cnn_torchscript(d / "x.pt"), d / "t.pt"),
    "checkpoint": lambda d: _checkpoint(d / "c.pt"),
}  # fmt: skip


def _export_with(changes: dict[str, bytes | None]) -> Callable[..., Path]:
    """The tiny .pt2 with some entries (by their name below the root) replaced or left out."""

    def make(d: Path) -> Path:
        return mf.zip_rewritten(mf.tiny_cnn_export(d / "base.pt2"), d / "m.pt2", changes)

    return make


# Read as text and JSON, before anything is deserialised: the gateway refuses them at upload.
BAD_CONTENTS: dict[str, tuple[Callable[..., Path], str, str]] = {
    "source writes a file": (
        _with_entry("{root}/code/__torch__/evil.py", b"def f(x):\n    torch.save(x, 'p')\n"),
        "torchscript",
        "calls torch.save",
    ),
    "source calls a custom operator": (
        _with_entry("{root}/code/__torch__/evil.py", b"def f(x):\n    return ops.evil.run(x)\n"),
        "torchscript",
        "calls ops.evil",
    ),
    "pickled weights": (
        _export_with(
            {
                "data/weights/model_weights_config.json": b'{"config": {"w": '
                b'{"path_name": "weight_0", "use_pickle": true}}}'
            }
        ),
        "export",
        "is pickled",
    ),
    "constant that is an object": (
        _export_with(
            {
                "data/constants/model_constants_config.json": b'{"config": {"c": '
                b'{"path_name": "custom_obj_0"}}}'
            }
        ),
        "export",
        "serialised object",
    ),
    "malformed payload configuration": (
        _export_with({"data/constants/model_constants_config.json": b'{"config": [1]}'}),
        "export",
        "is malformed",
    ),
    "not a pt2 archive_format": (
        _export_with({"archive_format": b"pt3"}),
        "export",
        "archive_format is not 'pt2'",
    ),
    "no exported program": (
        _export_with({"models/model.json": None}),
        "export",
        "holds no exported program",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONTENTS))
def test_what_an_archive_says_is_refused_by_both_for_the_same_reason(
    tmp_path: Path, case: str
) -> None:
    make, fmt, reason = BAD_CONTENTS[case]
    path = make(tmp_path)
    assert reason in str(gateway_model(path)), gateway_model(path)
    assert reason in str(engine_model(path, fmt)), engine_model(path, fmt)


GOOD_MODELS: dict[str, tuple[Callable[..., Path], str]] = {
    "torchscript": (lambda d: mf.tiny_cnn_torchscript(d / "m.pt"), "torchscript"),
    "export": (lambda d: mf.tiny_cnn_export(d / "m.pt2"), "export"),
    # under the ratio floor: 512 KiB of zeros, ~500-fold, expands to no more than it declares
    "small entry compressing well": (_deflated_zeros(RATIO_CHECKED_FROM_BYTES // 2), "torchscript"),
}


def _bomb(d: Path, expanded_bytes: int) -> Path:
    return mf.zip_bomb(d / "b.pt", expanded_bytes, base=mf.tiny_cnn_torchscript(d / "x.pt"))


def _checkpoint(path: Path) -> Path:
    import torch

    torch.save({"w": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_a_model_archive_is_refused_by_both_or_neither(tmp_path: Path, case: str) -> None:
    path = BAD_MODELS[case](tmp_path)
    gateway, engine = gateway_model(path), engine_model(path, "torchscript")
    assert gateway is not None, f"{case}: the gateway accepted what an audit refuses ({engine})"
    assert engine is not None, f"{case}: the engine accepted what the gateway refused ({gateway})"


@pytest.mark.parametrize("case", list(GOOD_MODELS))
def test_a_good_model_archive_is_accepted_by_both(tmp_path: Path, case: str) -> None:
    make, fmt = GOOD_MODELS[case]
    path = make(tmp_path)
    assert gateway_model(path) is None
    assert engine_model(path, fmt) is None


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("traversal", "climbs out of the archive"),
        ("shared library", "is a native library or binary code"),
        ("bomb (ratio)", "a compression bomb"),
        ("too many entries", f"at most {LIMITS.max_entries}"),
        ("bomb (total)", f"would expand past {LIMITS.max_uncompressed_bytes} bytes"),
    ],
)
def test_both_sides_give_the_same_reason(tmp_path: Path, case: str, reason: str) -> None:
    path = BAD_MODELS[case](tmp_path)
    assert reason in str(gateway_model(path))
    assert reason in str(engine_model(path, "torchscript"))


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def _npy(array: np.ndarray, allow_pickle: bool = False) -> Callable[..., Path]:
    def make(d: Path) -> Path:
        np.save(d / "d.npy", array, allow_pickle=allow_pickle)
        return d / "d.npy"

    return make


def _npz(compressed: bool = False, **arrays: np.ndarray) -> Callable[..., Path]:
    def make(d: Path) -> Path:
        (np.savez_compressed if compressed else np.savez)(d / "d.npz", **arrays)  # type: ignore[operator]
        return d / "d.npz"

    return make


def _zip(entries: dict[str, bytes]) -> Callable[..., Path]:
    def make(d: Path) -> Path:
        with zipfile.ZipFile(d / "d.npz", "w") as out:
            for name, data in entries.items():
                out.writestr(name, data)
        return d / "d.npz"

    return make


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


IMAGES = np.zeros((4, 1, 8, 8), np.float32)
NAN_IMAGES = IMAGES.copy()
NAN_IMAGES[0, 0, 0, 0] = np.nan
NAN_MASK = np.zeros((8, 8))
NAN_MASK[1, 1] = np.inf
# a Cartesian sampling mask: every 4th column and the centre, ~250-fold in savez_compressed
MASK = np.zeros((256, 256), np.float32)
MASK[:, ::4] = 1
MASK[:, 120:136] = 1

BAD_DATASETS: dict[str, Callable[..., Path]] = {
    "pickled .npy": _npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True),
    "complex": _npy(np.zeros((2, 8, 8), np.complex64)),
    "strings": _npy(np.array([["a"]])),
    "NaN images": _npy(NAN_IMAGES),
    "too many images": _npy(np.zeros((4097, 1, 1), np.uint8)),
    "no images": _npy(np.zeros((0, 1, 4, 4), np.float32)),
    "1-D": _npy(np.zeros(16)),
    "too many channels": _npy(np.zeros((1, 17, 4, 4), np.float32)),
    "too tall": _npy(np.zeros((1, 1025, 1), np.float32)),
    "infinite mask": _npz(images=IMAGES, mask=NAN_MASK),
    "pickled member": _npz(images=IMAGES, obj=np.array([object()], dtype=object)),
    "float labels": _npz(images=IMAGES, labels=np.zeros(4)),
    "negative labels": _npz(images=IMAGES, labels=np.array([0, -1, 1, 0])),
    "labels not one per image": _npz(images=IMAGES, labels=np.array([0, 1, 1])),
    "native entry": _zip({"images.npy": _npy_bytes(IMAGES), "evil.so": b"\x7fELF"}),
    "entry not an array": _zip({"images.npy": _npy_bytes(IMAGES), "notes.txt": b"hi"}),
    "entry in a folder": _zip({"images.npy": _npy_bytes(IMAGES), "sub/x.npy": _npy_bytes(IMAGES)}),
    "traversal": _zip({"images.npy": _npy_bytes(IMAGES), "../x.npy": _npy_bytes(IMAGES)}),
    "too many arrays": _npz(images=IMAGES, **{f"a{i}": np.zeros(1) for i in range(64)}),
    "bomb": _npz(compressed=True, images=IMAGES, big=np.zeros((1024, 1024), np.float32)),
    "truncated": lambda d: mf.truncated_copy(_npz(images=IMAGES, mask=MASK)(d), d / "t.npz"),
}

GOOD_DATASETS: dict[str, Callable[..., Path]] = {
    "npy": _npy(IMAGES),
    "npy [N, H, W] uint8": _npy(np.zeros((3, 8, 8), np.uint8)),
    "npz with labels": _npz(images=IMAGES, labels=np.array([0, 1, 2, 1])),
    "npz with a compressed mask": _npz(compressed=True, images=IMAGES, mask=MASK),
    "4096 images": _npy(np.zeros((4096, 1, 1), np.uint8)),
}


@pytest.mark.parametrize("case", list(BAD_DATASETS))
def test_a_dataset_is_refused_by_both_or_neither(tmp_path: Path, case: str) -> None:
    path = BAD_DATASETS[case](tmp_path)
    gateway, engine = gateway_dataset(path), engine_dataset(path)
    assert gateway is not None, f"{case}: the gateway accepted what an audit refuses ({engine})"
    assert engine is not None, f"{case}: the engine accepted what the gateway refused ({gateway})"


@pytest.mark.parametrize("case", list(GOOD_DATASETS))
def test_a_good_dataset_is_accepted_by_both(tmp_path: Path, case: str) -> None:
    path = GOOD_DATASETS[case](tmp_path)
    assert gateway_dataset(path) is None
    assert engine_dataset(path) is None


def test_the_compressed_mask_is_below_the_ratio_floor_and_past_the_ratio() -> None:
    """Why the floor is 1 MiB: this ordinary mask expands over 200-fold in 256 KiB."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, mask=MASK)
    (entry,) = zipfile.ZipFile(buffer).infolist()
    assert entry.file_size < RATIO_CHECKED_FROM_BYTES
    assert entry.file_size / entry.compress_size > DEFAULT_ARCHIVE_LIMITS.max_compression_ratio


# ---------------------------------------------------------------------------------------------
# The limits: one settings object, passed to the runner
# ---------------------------------------------------------------------------------------------


def test_the_defaults_are_the_settings_defaults() -> None:
    assert Settings().archive_limits == DEFAULT_ARCHIVE_LIMITS


def test_an_old_job_without_limits_gets_the_defaults() -> None:
    job = RunnerRequest.model_validate(
        {
            "kind": "admit",
            "model_file": "model.pt",
            "model_format": "torchscript",
            "model_sha256": "0" * 64,
            "spec": mf.tiny_cnn_spec(),
        }
    )
    assert job.archive_limits == DEFAULT_ARCHIVE_LIMITS


def test_the_worker_writes_its_settings_limits_into_the_job(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        max_archive_entries=7,
        max_archive_uncompressed_bytes=12345,
        max_compression_ratio=50.0,
    )
    sha256, _, _ = BlobStore(settings.blob_dir).put_file(mf.tiny_cnn_torchscript(tmp_path / "m.pt"))
    model = SimpleNamespace(
        id="mdl_1", sha256=sha256, format="torchscript", spec=mf.tiny_cnn_spec()
    )
    job_dir = materialise_admission_job(settings, model, 1)  # type: ignore[arg-type]
    job = RunnerRequest.model_validate_json((job_dir / JOB_FILE).read_text(encoding="utf-8"))
    assert job.archive_limits == ArchiveLimits(
        max_entries=7, max_uncompressed_bytes=12345, max_compression_ratio=50.0
    )


def test_the_engine_holds_archives_to_the_limits_in_force(tmp_path: Path) -> None:
    path = _many_entries(tmp_path)  # fine by the defaults, too many by LIMITS
    screen_archive(path, "torchscript")
    assert archive_limits() == DEFAULT_ARCHIVE_LIMITS
    with archive_limits_in_force(LIMITS):
        assert archive_limits() == LIMITS
        with pytest.raises(ModelRejected, match="entries; at most 64"):
            screen_archive(path, "torchscript")
    assert archive_limits() == DEFAULT_ARCHIVE_LIMITS


def test_refusals_are_neutral_value_errors(tmp_path: Path) -> None:
    path = tmp_path / "empty.zip"
    zipfile.ZipFile(path, "w").close()
    with pytest.raises(InputRefused) as raised:
        inspect_zip(path, LIMITS)
    assert (
        isinstance(raised.value, ValueError) and raised.value.reason == "the zip archive is empty"
    )
