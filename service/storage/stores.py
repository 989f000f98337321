"""Content-addressed blobs (models, datasets) and per-audit artifacts (reports, figures,
arrays), kept in the object store the settings name (service/storage/objects.py): the data
directory by default, or an S3-compatible bucket.

Blobs live at `blobs/<sha[:2]>/<sha>`, artifacts at `artifacts/<audit_id>/<name>`. An upload is
received into a local staging file (`<blob_dir>/tmp`), hashed while it streams, then committed:
renamed into place in the data directory, or uploaded to the bucket (atomically either way), so
a reader never sees a partial object.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.common import SAFE_NAME
from service.storage.objects import LocalObjectStore, ObjectInfo, ObjectStore, object_store

if TYPE_CHECKING:
    from service.settings import Settings

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds {limit} bytes")
        self.limit = limit


class BlobStore:
    """`root`: the local blob directory (staging files under `root/tmp`; the blobs themselves
    too unless `objects`, the store's `blobs/` prefix, is elsewhere)."""

    def __init__(self, root: Path, objects: ObjectStore | None = None) -> None:
        self.root = root
        self.objects = objects if objects is not None else LocalObjectStore(root)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    @property
    def is_local(self) -> bool:
        """The blobs are files under `root` (the data directory backend)."""
        return isinstance(self.objects, LocalObjectStore) and self.objects.root == self.root

    @staticmethod
    def key(sha256: str) -> str:
        if not _SHA256.match(sha256):
            raise ValueError("not a sha256 digest")
        return f"{sha256[:2]}/{sha256}"

    def path(self, sha256: str) -> Path:
        """Where the blob is on the local backend (the data directory)."""
        return self.root / self.key(sha256)

    def exists(self, sha256: str) -> bool:
        if self.is_local:
            return self.path(sha256).is_file()
        return self.objects.exists(self.key(sha256))

    def fetch(self, sha256: str, dest: Path) -> None:
        """Copy the blob to `dest`, checked against its sha256 (ObjectMissing, ObjectCorrupt)."""
        self.objects.get_file(self.key(sha256), dest, sha256)

    def _temp(self) -> tuple[int, str]:
        return tempfile.mkstemp(dir=self.root / "tmp", prefix="upload-")

    def commit_staged(self, tmp: Path | str, digest: str) -> str:
        """Move a staged file whose sha256 is `digest` into the store (a no-op if the blob is
        there already); the staging file is gone afterwards. Returns the blob's key."""
        key = self.key(digest)
        try:
            if self.is_local:
                final = self.path(digest)
                final.parent.mkdir(parents=True, exist_ok=True)
                if not final.exists():
                    os.replace(tmp, final)
            elif not self.objects.exists(key):
                self.objects.put_file(key, Path(tmp), digest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return key

    def _commit(self, tmp: str, digest: str) -> Path:
        self.commit_staged(tmp, digest)
        return self.path(digest)

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


@dataclass(frozen=True)
class StoredArtifact:
    name: str
    key: str  # `<audit_id>/<name>`, relative to the artifact store (the Artifact row's path)
    sha256: str
    size: int


class ArtifactStore:
    """Files produced by an audit: `artifacts/<audit_id>/<name>`. `root`: the local artifact
    directory; `objects`: the store's `artifacts/` prefix when it is elsewhere."""

    def __init__(
        self, root: Path, objects: ObjectStore | None = None, presign_seconds: int = 0
    ) -> None:
        self.root = root
        self.objects = objects if objects is not None else LocalObjectStore(root)
        # > 0: downloads may be sent to a presigned URL of the bucket valid this long
        # (storage_presign_seconds; service/api/stored_files.py decides which)
        self.presign_seconds = presign_seconds
        if isinstance(self.objects, LocalObjectStore):
            self.objects.root.mkdir(parents=True, exist_ok=True)

    def dir_for(self, audit_id: str) -> Path:
        if not SAFE_NAME.match(audit_id):
            raise ValueError("bad audit id")
        return self.root / audit_id

    def path(self, audit_id: str, name: str) -> Path:
        if not SAFE_NAME.match(name):
            raise ValueError("bad artifact name")
        return self.dir_for(audit_id) / name

    def import_files(self, audit_id: str, files: Iterable[Path]) -> list[StoredArtifact]:
        """Store runner outputs (only plain files with safe names; links are skipped). Each is
        written atomically (a temporary name renamed into place, or one upload): a reader (or
        a full disk) never sees a half-written artifact under its real name."""
        if not SAFE_NAME.match(audit_id):
            raise ValueError("bad audit id")
        stored: list[StoredArtifact] = []
        for f in files:
            if f.is_symlink() or not f.is_file() or not SAFE_NAME.match(f.name):
                continue
            key = f"{audit_id}/{f.name}"
            digest = sha256_file(f)
            info = self.objects.put_file(key, f, digest)
            stored.append(StoredArtifact(f.name, key, digest, info.size))
        return stored

    def locate(self, relative: str) -> ObjectInfo | None:
        """The stored file `relative` (an Artifact row's path, an audit's report_path); None
        when it is missing or the path would leave the store."""
        try:
            local = self.objects.local_path(relative)
            if local is not None and not local.resolve().is_relative_to(self.root.resolve()):
                return None
            return self.objects.head(relative)
        except ValueError:
            return None

    def local_path(self, relative: str) -> Path | None:
        return self.objects.local_path(relative)

    def read_bytes(self, relative: str, sha256: str | None = None) -> bytes:
        return self.objects.read_bytes(relative, sha256)

    def remove_audit(self, audit_id: str) -> None:
        """Drop what an audit that did not finish left here (no row points at it)."""
        self.dir_for(audit_id)  # checks the id
        if isinstance(self.objects, LocalObjectStore):
            shutil.rmtree(self.dir_for(audit_id), ignore_errors=True)
        else:
            self.objects.delete_prefix(audit_id)


def blob_store(settings: Settings) -> BlobStore:
    """The blob store of these settings (its staging directory is always local)."""
    if not settings.storage_url:
        return BlobStore(settings.blob_dir)
    return BlobStore(settings.blob_dir, object_store(settings).child("blobs"))


def artifact_store(settings: Settings) -> ArtifactStore:
    if not settings.storage_url:
        return ArtifactStore(settings.artifact_dir)
    return ArtifactStore(
        settings.artifact_dir,
        object_store(settings).child("artifacts"),
        presign_seconds=settings.storage_presign_seconds,
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
