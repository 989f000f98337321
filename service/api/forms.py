"""Helpers shared by the upload routes: the `spec` form field and the archive limits."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from schemas.archive_rules import ArchiveLimits
from service.api.body_limits import json_depth_exceeds, too_deep
from service.api.problems import describe, field_errors
from service.domain.errors import ValidationFailed
from service.settings import Settings

SpecT = TypeVar("SpecT", bound=BaseModel)

# The `spec` models of the upload routes, by name: FastAPI files under components/schemas only
# the models its own parameters and responses name, so the app's OpenAPI hook adds these.
UPLOAD_SPEC_MODELS: dict[str, type[BaseModel]] = {}


def archive_limits(settings: Settings) -> ArchiveLimits:
    """The limits an upload is inspected with: the ones workers pass to the runner."""
    return settings.archive_limits


def parse_spec(model: type[SpecT], raw: str | None, max_depth: int) -> SpecT:
    """Validate the `spec` form field; errors name the field as `spec.<path>`. JSON nested
    deeper than `max_depth` is a 400 `bad-request` before anything parses it, as a JSON body is
    (service.api.body_limits)."""
    if raw is None:
        raise ValidationFailed(
            "The form has no 'spec' field: send the spec as JSON text.",
            errors=field_errors([{"loc": ["spec"], "msg": "Field required", "type": "missing"}]),
        )
    if json_depth_exceeds(raw.encode("utf-8", "surrogatepass"), max_depth):
        raise too_deep(max_depth, "The 'spec' field's JSON")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = field_errors(exc.errors(), prefix=["spec"])
        raise ValidationFailed(describe(errors), errors=errors) from None


def multipart_upload_body(
    file_description: str, spec_model: type[BaseModel], spec_description: str
) -> dict[str, Any]:
    """OpenAPI for a `file` + `spec` multipart upload (FastAPI cannot infer it: the routes
    stream the body themselves). `spec` is stated as what `parse_spec` reads: the JSON text of
    `spec_model`, i.e. a part of type application/json (a plain text field holding the same
    JSON is read alike). `spec_model`'s schema is filed under components/schemas by the app's
    OpenAPI hook (UPLOAD_SPEC_MODELS)."""
    UPLOAD_SPEC_MODELS[spec_model.__name__] = spec_model
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "spec"],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": file_description,
                            },
                            "spec": {
                                "$ref": f"#/components/schemas/{spec_model.__name__}",
                                "description": spec_description,
                            },
                        },
                    },
                    "encoding": {"spec": {"contentType": "application/json"}},
                }
            },
        }
    }
