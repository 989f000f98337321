"""What an uploaded model file is, decided from its bytes alone (no torch, nothing executed).

Uploaded models are programs, so the gateway only reads structure: the zip central directory of
TorchScript and torch.export archives (never extracting anything; the TorchScript source and the
`.pt2` payload configuration are read as text and JSON), the JSON header of
`.safetensors` and the protobuf fields of ONNX models (service.api.inspect_onnx). Archives are
held to schemas.archive_rules, the rules the engine applies again in the sandbox. Loading and
probing happen later, in the worker's sandbox. Every refusal is an `InvalidUpload` (422) whose
detail says what is wrong.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.archive_rules import (
    ZIP_MAGIC,
    ArchiveLimits,
    InputRefused,
    archive_root,
    check_model_contents,
    check_model_entries,
    inspect_zip,
    zip_model_format,
)
from schemas.model_spec import REGISTERED_ARCHITECTURES, ModelFormat, ModelSpec
from schemas.problem import FieldError
from service.api.inspect_onnx import inspect_onnx
from service.domain.errors import InvalidUpload

# An ONNX ModelProto starts with its ir_version (field 1, varint), as every ONNX writer orders it.
ONNX_FIRST_BYTE = b"\x08"
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own reference limit
SAFETENSORS_DTYPES = {
    "BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64",
}  # fmt: skip


# What every refusal of a pickle says: the formats accepted, and how to save each.
ACCEPTED_MODEL_FORMATS = (
    "models must be TorchScript (torch.jit.save(torch.jit.script(model), 'model.pt')), "
    "torch.export (torch.export.save(torch.export.export(model, (example,)), 'model.pt2')), "
    "ONNX (torch.onnx.export(model, (example,), 'model.onnx')) or safetensors weights "
    "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors'), with "
    "spec.architecture naming a registered architecture); see docs/models.md"
)
# Pickle protocols 2 to 5 start with PROTO (0x80) and the protocol number; torch.save without
# its zip format (_use_new_zipfile_serialization=False) writes protocol 2.
PICKLE_PROTOCOLS = frozenset(range(2, 6))


@dataclass
class ModelInspection:
    format: ModelFormat
    info: dict[str, Any] = field(default_factory=dict)


def _refuse(detail: str) -> InvalidUpload:
    return InvalidUpload(detail)


def _zip_model_format(path: Path, limits: ArchiveLimits) -> ModelInspection:
    """The rules of schemas.archive_rules (the engine's too), then the format from the names."""
    try:
        entries = inspect_zip(path, limits)
        root = archive_root(entries)
        fmt = zip_model_format(entry.filename for entry in entries)
        if fmt is not None:
            check_model_entries(entries, fmt)
            check_model_contents(path, entries, fmt)
    except InputRefused as exc:
        raise _refuse(exc.reason) from None
    names = {entry.filename for entry in entries}
    info = {"entries": len(entries), "uncompressed_bytes": sum(e.file_size for e in entries)}
    if fmt is not None:
        return ModelInspection(fmt, info)
    if f"{root}/data.pkl" in names:
        raise _refuse(
            "this is a torch.save checkpoint (pickled Python objects, which run code when "
            f"loaded), which is not accepted: {ACCEPTED_MODEL_FORMATS}"
        )
    raise _refuse("a zip archive that is neither a TorchScript nor a torch.export model")


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file, checked against the file's real size."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _refuse("the file is too short to be anything this service accepts")
        (header_len,) = struct.unpack("<Q", prefix)
        if not 2 <= header_len <= min(SAFETENSORS_MAX_HEADER, file_size - 8):
            raise _refuse("not a .safetensors file (the header length does not fit the file)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _refuse("not a .safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise _refuse("not a .safetensors file (the header is not a JSON object)")
    data_size = file_size - 8 - header_len
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        _check_tensor_entry(name, tensor, data_size)
    return header


def _check_tensor_entry(name: str, tensor: Any, data_size: int) -> None:
    if not isinstance(tensor, dict) or tensor.get("dtype") not in SAFETENSORS_DTYPES:
        raise _refuse(f".safetensors tensor {name!r} has no known dtype")
    shape, offsets = tensor.get("shape"), tensor.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _refuse(f".safetensors tensor {name!r} has a malformed shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise _refuse(f".safetensors tensor {name!r} points outside the file")


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(9)[8:9] == b"{"


def _is_raw_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS


def inspect_model(path: Path, spec: ModelSpec, limits: ArchiveLimits) -> ModelInspection:
    """Detect and check the format of an uploaded model; InvalidUpload on anything else."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        return _zip_model_format(path, limits)
    if head[:2] == b"PK":
        raise _refuse("a zip archive that does not start with a local file header")
    if head[:1] == ONNX_FIRST_BYTE and not _looks_like_safetensors(path):
        return ModelInspection("onnx", inspect_onnx(path))
    if _is_raw_pickle(head) and not _looks_like_safetensors(path):
        raise _refuse(
            "this is a raw pickle (pickle.dump, or torch.save with "
            "_use_new_zipfile_serialization=False): pickled Python objects run code when "
            f"loaded, so a pickle is not accepted, whatever its extension: {ACCEPTED_MODEL_FORMATS}"
        )
    header = read_safetensors_header(path)
    tensors = [name for name in header if name != "__metadata__"]
    if not tensors:
        raise _refuse("the .safetensors file holds no tensors")
    if spec.architecture is None:
        raise InvalidUpload(
            ".safetensors holds weights only: name a registered architecture in "
            f"spec.architecture (one of: {', '.join(REGISTERED_ARCHITECTURES)})",
            errors=[FieldError(loc=["spec", "architecture"], msg="required", type="missing")],
        )
    return ModelInspection("safetensors", {"tensors": len(tensors)})
