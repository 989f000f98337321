"""The blobs a worker fetched from the object store, kept in its own scratch directory.

On the data directory backend a worker copies a blob straight from `<data_dir>/blobs` into a
job directory, as before. With a bucket (TIGHTROPE_STORAGE_URL) it keeps what it downloaded
under `<data_dir>/blob-cache/<sha[:2]>/<sha>`: content-addressed, written atomically (a
temporary file renamed into place, after the sha256 was checked), checked again against its
sha256 before every reuse (a corrupted copy is dropped and fetched anew), and evicted least
recently used first once the cache holds more than TIGHTROPE_WORKER_BLOB_CACHE_BYTES. A second
shard of the same audit on the same worker, or an audit of the same model, downloads nothing.

Several worker processes of one host share the directory: each step is a rename or an unlink,
and a copy that another process evicted meanwhile is fetched again.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from service.settings import Settings
from service.storage.objects import ObjectMissing
from service.storage.stores import BlobStore, blob_store, sha256_file

log = logging.getLogger(__name__)

CACHE_DIR = "blob-cache"


class BlobMissing(Exception):
    """The blob store has no object with this sha256."""


class BlobCache:
    def __init__(self, root: Path, store: BlobStore, max_bytes: int) -> None:
        self.root = root
        self.store = store
        self.max_bytes = max_bytes
        self.downloads = 0  # objects fetched from the store by this process
        self.hits = 0  # verified copies reused
        self._lock = threading.Lock()

    def _path(self, sha256: str) -> Path:
        return self.root / BlobStore.key(sha256)

    def copy_to(self, sha256: str, dest: Path) -> None:
        """Put a verified copy of the blob at `dest` (a copy, never a link: a job directory is
        the sandbox's to write)."""
        if self.store.is_local:
            source = self.store.path(sha256)
            if not source.is_file():
                raise BlobMissing(sha256)
            shutil.copyfile(source, dest)
            return
        for _ in range(3):
            cached = self.fetch(sha256)
            try:
                shutil.copyfile(cached, dest)
                return
            except FileNotFoundError:  # evicted by another process between the two steps
                continue
        raise BlobMissing(sha256)

    def fetch(self, sha256: str) -> Path:
        """The cached copy, verified; downloaded (and checked) when missing or damaged."""
        path = self._path(sha256)
        with self._lock:
            if path.is_file() and not path.is_symlink():
                if sha256_file(path) == sha256:
                    os.utime(path)  # most recently used
                    self.hits += 1
                    return path
                log.warning("blob cache: %s no longer has its sha256; fetching it again", path)
                path.unlink(missing_ok=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.store.fetch(sha256, path)  # atomic, checked against the sha256
            except ObjectMissing:
                raise BlobMissing(sha256) from None
            self.downloads += 1
            self._evict(keep=path)
            return path

    def _evict(self, keep: Path) -> None:
        entries = []
        for file in self.root.glob("*/*"):
            if file.name.startswith(".partial-") or not file.is_file():
                continue
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, file))
        total = sum(size for _, size, _ in entries)
        for _, size, file in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if file == keep:
                continue
            file.unlink(missing_ok=True)
            total -= size


_caches: dict[tuple[Path, str, str | None], BlobCache] = {}
_caches_lock = threading.Lock()


def worker_blobs(settings: Settings) -> BlobCache:
    """This process's cache for these settings (one per data directory and store)."""
    key = (settings.data_dir, settings.storage_url, settings.storage_endpoint_url)
    with _caches_lock:
        cache = _caches.get(key)
        if cache is None:
            cache = BlobCache(
                settings.data_dir / CACHE_DIR,
                blob_store(settings),
                settings.worker_blob_cache_bytes,
            )
            _caches[key] = cache
        return cache
