"""Small shared building blocks."""

from __future__ import annotations

import copy
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

# The largest seed a request may carry: it must fit torch's 64-bit generator seed (and numpy's),
# so a huge integer is a 422 naming the field, not a failed audit. (The audit's own `seed` is
# bounded tighter, at 2**31 - 1: the engine derives per-image seeds from it by arithmetic.)
MAX_SEED = 2**63 - 1

# A name the artifact store accepts: an artifact's file name, an audit's directory. The engine
# writes no other artifact name (workers.engine.audit), the store serves none
# (service.storage.stores).
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class StrictModel(BaseModel):
    """Base of every request-side model: unknown fields are an error, so typos surface as 422."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _kind_required(schema: dict[str, Any]) -> None:
    required = schema.setdefault("required", [])
    if "kind" not in required:
        required.insert(0, "kind")


class TaggedModel(StrictModel):
    """A member of a union told apart by `kind` (a check, an operator). `kind` has a default for
    Python callers, but the union needs it to pick the member, so a request must send it: the
    JSON schema says it is required (validation is unchanged)."""

    model_config = ConfigDict(json_schema_extra=_kind_required)


PartT = TypeVar("PartT", bound=BaseModel)


def model_part(model: BaseModel, part: type[PartT]) -> PartT:
    """The fields of `part` that `model` holds, as a `part` of their own: a check composed of its
    threat model and its search settings (schemas/checks.py) hands each back. `model` is one of
    `part`'s subclasses, so its values are already valid; the fields it was given explicitly
    stay the explicitly given ones (`exclude_unset` dumps agree)."""
    names = part.model_fields
    return part.model_construct(
        _fields_set=model.model_fields_set & set(names),
        **{name: copy.deepcopy(getattr(model, name)) for name in names},
    )


class UploadedArray(StrictModel):
    """An array from a dataset uploaded through `POST /v1/datasets` (the service's form)."""

    dataset_id: str = Field(min_length=1, max_length=64)
    key: str | None = Field(
        default=None, description="Array name inside an .npz; default: the first"
    )


class FileArray(StrictModel):
    """A local `.npy`/`.npz` file: accepted by the local CLI only, never by the service."""

    file: str = Field(min_length=1, max_length=4096)
    key: str | None = Field(
        default=None, description="Array name inside an .npz; default: the first"
    )


ArrayRef = UploadedArray | FileArray


DEFAULT_MAX_REGRESSION = 0.05  # with compare_with: 5 % worse than the reference, per figure


class RegressionBound(StrictModel):
    """Mixed into every check's threshold: how much worse than the reference model
    (`compare_with`) each figure of the check may be, relative: (new − old)/|old| in the
    worse direction (schemas.comparisons)."""

    max_regression: float | None = Field(
        default=None,
        ge=0.0,
        le=1000.0,
        description="With compare_with: the largest relative regression against the reference "
        f"model each figure of this check may show; default {DEFAULT_MAX_REGRESSION}",
    )
