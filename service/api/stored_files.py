"""Stored files (reports, artifacts) as responses, with byte ranges: `Range: bytes=a-b` is
answered 206 with that part (Starlette's FileResponse); a range that the file cannot satisfy is
a 416 problem (with `Content-Range: bytes */<size>`), a malformed one a 400 problem, like every
other refusal of this API, instead of Starlette's plain-text answers."""

from __future__ import annotations

import os

from fastapi.responses import FileResponse
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from service.api.problems import MalformedRequest, RangeNotSatisfiableError, problem_response


class StoredFileResponse(FileResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        requested = Headers(scope=scope).get("range")
        if requested is not None and scope.get("method", "GET").upper() in ("GET", "HEAD"):
            size = os.stat(self.path).st_size
            try:
                self._parse_range_header(requested, size)
            except MalformedRangeHeader as exc:
                refused = MalformedRequest(f"The Range header is malformed: {exc.content}.")
                response = problem_response(refused.problem(instance=scope.get("path")))
                await response(scope, receive, send)
                return
            except RangeNotSatisfiable:
                unsatisfiable = RangeNotSatisfiableError(
                    f"The requested range is outside the file's {size} bytes."
                )
                response = problem_response(
                    unsatisfiable.problem(instance=scope.get("path")),
                    headers={"Content-Range": f"bytes */{size}"},
                )
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
