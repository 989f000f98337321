"""Multipart uploads streamed straight to disk with a byte cap.

FastAPI's `UploadFile` spools the whole body before a route runs, so the cap could only be
checked afterwards. Here the body is parsed as it arrives: the file part goes to a staging file
next to the blob store (hashed while it streams), small text fields are kept in memory, and the
upload stops at the first byte over the cap. A staged upload becomes a blob only when the route
calls `commit`; on every other path the staging file is deleted, so a refused upload leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from python_multipart.multipart import (
    MultipartParseError,
    MultipartParser,
    MultipartState,
    parse_options_header,
)
from starlette.requests import Request

from service.domain.errors import (
    MalformedRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from service.storage.stores import BlobStore

MAX_FIELD_BYTES = 64 * 1024  # a `spec` is a few hundred bytes of JSON
MAX_FIELDS = 8
# Multipart framing (boundaries, part headers) on top of the file and the text fields.
FRAMING_ALLOWANCE = MAX_FIELDS * (MAX_FIELD_BYTES + 1024)


@dataclass
class StagedUpload:
    """A received upload waiting for inspection: the file on disk plus the text fields."""

    path: Path
    sha256: str = ""
    size: int = 0
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    committed: bool = False

    def commit(self, store: BlobStore) -> str:
        """Move the file into the content-addressed store (a no-op if the blob exists); its
        key. Blocking (an upload to a bucket): run it in a thread."""
        key = store.commit_staged(self.path, self.sha256)
        self.committed = True
        return key

    def discard(self) -> None:
        if not self.committed:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StagedUpload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()


class _FormCollector:
    """Callbacks of python-multipart's push parser for one request."""

    def __init__(self, out: IO[bytes], file_field: str, max_bytes: int) -> None:
        self.out = out
        self.file_field = file_field
        self.max_bytes = max_bytes
        self.hash = hashlib.sha256()
        self.size = 0
        self.file_seen = False
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._buffer = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._buffer = bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise MalformedRequest("A multipart part has no Content-Disposition name.")
        self._name = name.decode("utf-8", "replace")
        self._is_file = self._name == self.file_field
        if self._is_file:
            if self.file_seen:
                raise ValidationFailed(f"Send exactly one '{self.file_field}' part.")
            self.file_seen = True
            raw_filename = options.get(b"filename")
            self.filename = raw_filename.decode("utf-8", "replace") if raw_filename else None
        elif len(self.fields) >= MAX_FIELDS:
            raise ValidationFailed(f"Too many form fields (at most {MAX_FIELDS}).")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(
                    f"The file is larger than this service accepts ({self.max_bytes} bytes)."
                )
            self.hash.update(chunk)
            self.out.write(chunk)
            return
        self._buffer.extend(chunk)
        if len(self._buffer) > MAX_FIELD_BYTES:
            raise PayloadTooLarge(f"Form field '{self._name}' exceeds {MAX_FIELD_BYTES} bytes.")

    def _part_end(self) -> None:
        if not self._is_file and self._name is not None:
            try:
                self.fields[self._name] = self._buffer.decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationFailed(f"Form field '{self._name}' is not UTF-8 text.") from None


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UnsupportedMediaType("Send the upload as multipart/form-data.")
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedRequest("The multipart Content-Type has no boundary.")
    return boundary


def _check_declared_length(request: Request, max_bytes: int) -> None:
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isdigit()
        and int(declared) > max_bytes + FRAMING_ALLOWANCE
    ):
        raise PayloadTooLarge(
            f"The upload is larger than this service accepts ({max_bytes} bytes)."
        )


async def receive_upload(
    request: Request, store: BlobStore, max_bytes: int, file_field: str = "file"
) -> StagedUpload:
    """Parse a multipart request as it streams in. The caller owns the result: use it as a
    context manager so the staging file goes away unless committed."""
    boundary = _boundary(request)
    _check_declared_length(request, max_bytes)
    fd, tmp = tempfile.mkstemp(dir=store.root / "tmp", prefix="upload-")
    staged = StagedUpload(path=Path(tmp))
    try:
        with os.fdopen(fd, "wb") as out:
            collector = _FormCollector(out, file_field, max_bytes)
            parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
            try:
                async for chunk in request.stream():
                    parser.write(chunk)
                parser.finalize()
                if parser.state != MultipartState.END:
                    # python-multipart's finalize does not check this (its own TODO): a body
                    # cut short would pass as a complete upload.
                    raise MalformedRequest(
                        "The multipart body ends before its closing boundary; send it whole."
                    )
            except MultipartParseError as exc:
                raise MalformedRequest(f"The multipart body is malformed: {exc}") from None
        if not collector.file_seen:
            raise ValidationFailed(f"The form has no '{file_field}' part: attach the file.")
        staged.sha256 = collector.hash.hexdigest()
        staged.size = collector.size
        staged.filename = collector.filename
        staged.fields = collector.fields
        return staged
    except BaseException:
        staged.discard()
        raise
