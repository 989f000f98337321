"""Content-addressed blob store and per-audit artifact directories on the local filesystem.

Blobs live at `blobs/<sha[:2]>/<sha>`; a blob is written to a temporary file, hashed while it
streams, and renamed into place, so a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from schemas.common import SAFE_NAME

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds {limit} bytes")
        self.limit = limit


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError("not a sha256 digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def _temp(self) -> tuple[int, str]:
        return tempfile.mkstemp(dir=self.root / "tmp", prefix="upload-")

    def _commit(self, tmp: str, digest: str) -> Path:
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            os.unlink(tmp)
        else:
            os.replace(tmp, final)
        return final

    async def put_stream(
        self, chunks: AsyncIterator[bytes], max_bytes: int
    ) -> tuple[str, int, Path]:
        """Store a stream; UploadTooLarge as soon as it passes max_bytes (nothing kept)."""
        fd, tmp = self._temp()
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise UploadTooLarge(max_bytes)
                    h.update(chunk)
                    out.write(chunk)
        except BaseException:
            os.unlink(tmp)
            raise
        digest = h.hexdigest()
        return digest, size, self._commit(tmp, digest)

    def put_file(self, src: Path) -> tuple[str, int, Path]:
        fd, tmp = self._temp()
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
        digest = h.hexdigest()
        return digest, size, self._commit(tmp, digest)

    def put_bytes(self, data: bytes) -> tuple[str, int, Path]:
        digest = hashlib.sha256(data).hexdigest()
        fd, tmp = self._temp()
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return digest, len(data), self._commit(tmp, digest)


class ArtifactStore:
    """Files produced by an audit: `artifacts/<audit_id>/<name>`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def dir_for(self, audit_id: str) -> Path:
        if not SAFE_NAME.match(audit_id):
            raise ValueError("bad audit id")
        return self.root / audit_id

    def path(self, audit_id: str, name: str) -> Path:
        if not SAFE_NAME.match(name):
            raise ValueError("bad artifact name")
        return self.dir_for(audit_id) / name

    def import_files(self, audit_id: str, files: Iterable[Path]) -> list[tuple[str, Path]]:
        """Copy runner outputs in (only plain files with safe names; links are skipped)."""
        target = self.dir_for(audit_id)
        target.mkdir(parents=True, exist_ok=True)
        stored: list[tuple[str, Path]] = []
        for f in files:
            if f.is_symlink() or not f.is_file() or not SAFE_NAME.match(f.name):
                continue
            dest = target / f.name
            # Written under a temporary name and renamed: a reader (or a full disk) never sees
            # a half-written artifact under its real name.
            partial = target / f".partial-{f.name}"
            try:
                shutil.copyfile(f, partial)
                os.replace(partial, dest)
            finally:
                partial.unlink(missing_ok=True)
            stored.append((f.name, dest))
        return stored

    def remove_audit(self, audit_id: str) -> None:
        """Drop what an audit that did not finish left here (no row points at it)."""
        shutil.rmtree(self.dir_for(audit_id), ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
