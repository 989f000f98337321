"""Helpers shared by the upload routes: the `spec` form field and the archive limits."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from service.errors import ValidationFailed, describe, field_errors
from service.inspect_upload import ArchiveLimits
from service.settings import Settings

SpecT = TypeVar("SpecT", bound=BaseModel)


def archive_limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(
        max_entries=settings.max_archive_entries,
        max_uncompressed_bytes=settings.max_archive_uncompressed_bytes,
        max_compression_ratio=settings.max_compression_ratio,
    )


def parse_spec(model: type[SpecT], raw: str | None) -> SpecT:
    """Validate the `spec` form field; errors name the field as `spec.<path>`."""
    if raw is None:
        raise ValidationFailed(
            "The form has no 'spec' field: send the spec as JSON text.",
            errors=field_errors([{"loc": ["spec"], "msg": "Field required", "type": "missing"}]),
        )
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = field_errors(exc.errors(), prefix=["spec"])
        raise ValidationFailed(describe(errors), errors=errors) from None


def multipart_upload_body(file_description: str, spec_description: str) -> dict[str, Any]:
    """OpenAPI for a `file` + `spec` multipart upload (FastAPI cannot infer it: the routes
    stream the body themselves)."""
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
                            "spec": {"type": "string", "description": spec_description},
                        },
                    }
                }
            },
        }
    }
