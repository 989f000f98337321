"""Stored files (reports, artifacts) as responses, with byte ranges: `Range: bytes=a-b` is
answered 206 with that part (Starlette's FileResponse); a range that the file cannot satisfy is
a 416 problem (with `Content-Range: bytes */<size>`), a malformed one a 400 problem, like every
other refusal of this API, instead of Starlette's plain-text answers.

On the data directory backend a file is sent from disk as before; from a bucket
(service/storage/objects.py) it is streamed through the gateway with the same headers, ranges
and validators: the ETag is the object's sha256 where the store recorded one, and a whole-file
answer is checked against that sha256 as it streams: a corrupted object is cut off before its
last chunk, so no client ever receives it complete."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from email.utils import formatdate
from typing import Any, BinaryIO

import anyio.to_thread
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from service.api.problems import problem_response
from service.domain.errors import MalformedRequest, RangeNotSatisfiableError
from service.storage.objects import ObjectCorrupt, ObjectInfo, ObjectStore
from service.storage.stores import ArtifactStore


class StoredFileResponse(FileResponse):
    def _size(self) -> int:
        return os.stat(self.path).st_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        requested = Headers(scope=scope).get("range")
        if requested is not None and scope.get("method", "GET").upper() in ("GET", "HEAD"):
            size = self._size()
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


class _ObjectReader:
    """What FileResponse's handlers read a file through (`seek`, `read`), over an object of the
    store: one ranged GET from the position sought. A read of the whole object from its start
    is hashed, and its last chunk is withheld (ObjectCorrupt) unless the sha256 matches."""

    def __init__(self, store: ObjectStore, key: str, size: int, sha256: str | None) -> None:
        self.store, self.key, self.size, self.sha256 = store, key, size, sha256
        self.position = 0
        self.stream: BinaryIO | None = None
        self.hash: Any = hashlib.sha256() if sha256 else None

    async def seek(self, position: int) -> None:
        if position != self.position or self.stream is None:
            await self.aclose()
            self.position = position
            if position != 0:
                self.hash = None  # a part of the object: nothing to check it against

    async def read(self, size: int) -> bytes:
        if self.stream is None:
            self.stream = await anyio.to_thread.run_sync(
                self.store.open_stream, self.key, self.position
            )
        chunk: bytes = await anyio.to_thread.run_sync(self.stream.read, size)
        self.position += len(chunk)
        if self.hash is not None:
            self.hash.update(chunk)
            if self.position >= self.size and self.hash.hexdigest() != self.sha256:
                raise ObjectCorrupt(f"the stored object {self.key} is corrupt")
        return chunk

    async def aclose(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await anyio.to_thread.run_sync(stream.close)


class StoredObjectResponse(StoredFileResponse):
    """A stored object of a bucket, streamed through the gateway like a file from disk."""

    def __init__(
        self,
        store: ObjectStore,
        info: ObjectInfo,
        *,
        media_type: str,
        filename: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.info = info
        modified = info.modified.timestamp()
        fake = os.stat_result((stat.S_IFREG | 0o644, 0, 0, 1, 0, 0, info.size, 0, modified, 0))
        validators = {"etag": info.etag, "last-modified": formatdate(modified, usegmt=True)}
        super().__init__(
            info.key,
            media_type=media_type,
            filename=filename,
            headers={**validators, **(headers or {})},
            stat_result=fake,
        )

    def _size(self) -> int:
        return self.info.size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = {
            k: v for k, v in scope.get("extensions", {}).items() if k != "http.response.pathsend"
        }
        await super().__call__({**scope, "extensions": extensions}, receive, send)

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[Any]:
        reader = _ObjectReader(self.store, self.info.key, self.info.size, self.info.sha256)
        try:
            yield reader
        finally:
            with anyio.CancelScope(shield=True):
                await reader.aclose()


def stored_response(
    artifacts: ArtifactStore,
    key: str,
    info: ObjectInfo,
    *,
    media_type: str,
    filename: str | None = None,
    headers: Mapping[str, str] | None = None,
    presign: bool = False,
) -> Response:
    """The artifact store's file `key` (found by the rules, `info`) as a response: from disk on
    the data directory backend, streamed from the bucket otherwise. `presign` (the API's
    downloads): where the deployment asks for it (storage_presign_seconds), a 307 to a
    short-lived presigned URL of the object instead, for a file that needs no headers of ours:
    a document (`headers`: its Content-Security-Policy) always comes through the gateway."""
    local = artifacts.local_path(key)
    if local is not None:
        return StoredFileResponse(local, media_type=media_type, filename=filename, headers=headers)
    if presign and artifacts.presign_seconds > 0 and not headers:
        url = artifacts.objects.presigned_url(
            key, artifacts.presign_seconds, media_type=media_type, filename=filename
        )
        if url is not None:
            # private: the URL is a credential for the object until it expires
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    return StoredObjectResponse(
        artifacts.objects, info, media_type=media_type, filename=filename, headers=headers
    )
