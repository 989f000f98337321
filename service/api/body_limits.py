"""Limits on request bodies that are not uploads (docs/security.md, "Request limits").

`BodyLimitMiddleware` reads every non-multipart request body before the app does: a declared
Content-Length over `max_json_body_bytes` is answered 413 without reading a byte, a chunked body
is counted as it arrives and refused 413 as soon as it passes the cap, and a JSON body nested
deeper than `max_json_depth` is refused 400 before anything parses it (a JSON parser recurses
per level; pydantic never sees the document). Multipart uploads stream on to service.api.uploads,
which applies `max_upload_bytes` itself; their JSON `spec` field is held to the same depth by
service.api.forms.parse_spec (`too_deep`).
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import problem_response
from service.domain.errors import PayloadTooLarge, TightropeError

# A JSON string, escapes included: its brackets do not nest.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPEN = frozenset(b"[{")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit` (strings skipped; linear time)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        if byte in _OPEN:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def too_deep(max_depth: int, what: str = "The JSON body") -> TightropeError:
    """400 `bad-request`, like other JSON that cannot be read: `what` nests too deeply. The
    same for a JSON body and for the JSON `spec` field of a multipart upload."""
    return TightropeError(
        f"{what} nests arrays or objects deeper than {max_depth} levels (TIGHTROPE_MAX_JSON_DEPTH)."
    )


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


def _is_json(content_type: bytes | None) -> bool:
    """FastAPI parses a body as JSON when it has no Content-Type or a JSON one."""
    if not content_type:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


class BodyLimitMiddleware:
    """Pure ASGI middleware: buffers non-multipart bodies up to the cap, then replays them."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        chunked = _header(scope, b"transfer-encoding") is not None
        content_type = _header(scope, b"content-type")
        multipart = content_type is not None and content_type.lower().startswith(b"multipart/")
        if multipart or (not chunked and (declared is None or declared.strip() in (b"", b"0"))):
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(
            f"The request body is larger than this service accepts ({self.max_bytes} bytes; "
            "TIGHTROPE_MAX_JSON_BODY_BYTES).",
            headers={"Connection": "close"},
        )
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._refuse(too_large, scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before the body was complete
            body.extend(message.get("body", b""))
            if len(body) > self.max_bytes:
                await self._refuse(too_large, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        if _is_json(content_type) and json_depth_exceeds(bytes(body), self.max_depth):
            await self._refuse(too_deep(self.max_depth), scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(error: TightropeError, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(error.problem(instance=scope.get("path")), error.headers)
        await response(scope, receive, send)
