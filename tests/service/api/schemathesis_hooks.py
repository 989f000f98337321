"""Schemathesis hooks for test_schemathesis.py (loaded by the schemathesis process through
SCHEMATHESIS_HOOKS, as a file: it imports nothing of this repository).

The stateful phase chains requests along the OpenAPI links of the creates (service.api.app,
RESOURCE_LINKS), which only lead somewhere when a create succeeds. A generated upload is random
bytes, never a model or array file this service reads (the upload's content is beyond what its
JSON Schema can say), and a generated audit rarely fits a seeded model. So in that phase only,
half of the schema-valid (positive) creates are replaced by real ones: a .safetensors model
with its architecture, an .npy of images, the documented reconstruction example (for the seeded
ready model). The other phases, the other half and every negative case stay as generated.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, HookContext
from schemathesis.generation.meta import TestPhase


def _safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4)


def _npy() -> bytes:
    out = io.BytesIO()
    np.save(out, np.zeros((2, 1, 16, 16), np.float32))
    return out.getvalue()


MODEL_SPEC = {
    "name": "fuzzed",
    "task": "reconstruction",
    "input": "image",
    "image_shape": [1, 16, 16],
    "architecture": {"name": "dncnn"},
}
UPLOADS: dict[str, dict[str, Any]] = {
    "/v1/models": {"file": _safetensors(), "spec": MODEL_SPEC},
    "/v1/datasets": {"file": _npy(), "spec": {"name": "fuzzed"}},
}


def _documented_audit(case: Case) -> dict[str, Any]:
    content = case.operation.definition.raw["requestBody"]["content"]["application/json"]
    value: dict[str, Any] = content["examples"]["reconstruction"]["value"]
    return value


def _real_create(case: Case) -> Any | None:
    """The body of a create that succeeds, for the operations the links start from."""
    if case.method.upper() != "POST":
        return None
    if case.path in UPLOADS:
        return dict(UPLOADS[case.path])
    if case.path == "/v1/audits":
        return _documented_audit(case)
    return None


@schemathesis.hook
def flatmap_case(context: HookContext, case: Case) -> st.SearchStrategy[Case]:
    meta = case.meta
    body = _real_create(case)
    if (
        body is None
        or meta is None
        or meta.phase.name != TestPhase.STATEFUL
        or not meta.generation.mode.is_positive
    ):
        return st.just(case)

    def choose(real: bool) -> Case:
        if real:
            case.body = body
            # The real body as the case's generated starting state: schemathesis would otherwise
            # revalidate the edited body, find the file's bytes (which no JSON Schema validator
            # reads) and relabel the case negative. Private, hence the exact pin in pyproject.
            case._record_starting_state()
        return case

    return st.booleans().map(choose)
