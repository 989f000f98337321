"""The one skeleton of an upload route (`POST /v1/models`, `POST /v1/datasets`): stream the body
to a staging file (service.api.uploads), read its `spec` part, inspect the file in the thread
pool, move it into the blob store, then store the row in a session of its own. The routes give
the pieces that differ: their OpenAPI words, the spec's model, the inspection and the row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from schemas.archive_rules import ArchiveLimits
from service.api.deps import BlobsDep, SettingsDep, session_in_slot
from service.api.forms import archive_limits, parse_spec
from service.api.problems import problem_responses, response_header
from service.api.uploads import StagedUpload, receive_upload
from service.settings import Settings
from service.storage.stores import BlobStore

SpecT = TypeVar("SpecT", bound=BaseModel)
InspectionT = TypeVar("InspectionT")
RowT = TypeVar("RowT")


def upload_route(
    status_code: int,
    resource: type[BaseModel],
    body: dict[str, Any],
    answer: str,
    location: str,
    summary: str,
) -> dict[str, Any]:
    """The options of an upload route's `router.post(...)`: its status and resource, its
    multipart body (service.api.forms.multipart_upload_body), and its answers: `status_code`
    with a Location header (`location` describes it), and the problems an upload can meet."""
    return {
        "status_code": status_code,
        "response_model": resource,
        "openapi_extra": body,
        "responses": {
            status_code: {
                "description": answer,
                "headers": {"Location": response_header(location)},
            },
            **problem_responses(400, 401, 413, 415, 422, 503),
        },
        "summary": summary,
    }


@dataclass(frozen=True)
class Uploads:
    """An upload route's request, with what it takes to receive the file and store its row."""

    request: Request
    settings: Settings
    blobs: BlobStore

    async def receive_and_store(
        self,
        spec_model: type[SpecT],
        inspect: Callable[[Path, SpecT, ArchiveLimits], InspectionT],
        build: Callable[[SpecT, InspectionT, StagedUpload], RowT],
    ) -> RowT:
        """The row `build` makes of the upload, committed. The staging file is gone whatever
        happens (a refused upload leaves nothing behind); the database slot is held only while
        the row is stored, never while the body streams."""
        settings, blobs = self.settings, self.blobs
        with await receive_upload(self.request, blobs, settings.max_upload_bytes) as staged:
            spec = parse_spec(spec_model, staged.fields.get("spec"), settings.max_json_depth)
            limits = archive_limits(settings)
            inspection = await run_in_threadpool(inspect, staged.path, spec, limits)
            await run_in_threadpool(staged.commit, blobs)

        def store(session: Session) -> RowT:
            row = build(spec, inspection, staged)
            session.add(row)
            session.commit()
            return row

        async with session_in_slot(self.request) as session:
            return await run_in_threadpool(store, session)


def get_uploads(request: Request, settings: SettingsDep, blobs: BlobsDep) -> Uploads:
    return Uploads(request, settings, blobs)


UploadsDep = Annotated[Uploads, Depends(get_uploads)]
