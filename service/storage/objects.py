"""Where blobs, reports and artifacts are kept: the local data directory, or an S3-compatible
bucket (docs/deployment.md, "Object storage").

One setting chooses (`TIGHTROPE_STORAGE_URL`): empty keeps everything under the data directory
with today's layout (`blobs/<sha[:2]>/<sha>`, `artifacts/<audit_id>/<name>`); `s3://bucket/prefix`
keeps the same keys under that prefix of a bucket. Both backends give the same guarantees:

- a write is atomic: a reader sees the whole object or none (a temporary file renamed into
  place; a single PUT, or a multipart upload that is completed or aborted);
- every object carries the sha256 of its bytes (the S3 backend also asks the server for its
  own SHA-256 checksum, which S3 verifies on upload), and every read into a file or into memory
  is checked against it: a corrupted object is an `ObjectCorrupt`, never data;
- failures are typed: `StorageUnavailable` (unreachable, timing out, 5xx: try again later),
  `StorageFull` (no room, quota), `StorageRefused` (credentials, a missing bucket, access
  denied: a setting is wrong), each with a message that names the setting to look at.

Torch-free and HTTP-free: the gateway, the workers and the CLI use it alike.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlparse

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
SHA256_METADATA = "sha256"  # x-amz-meta-sha256: the hex sha256 of the object's bytes
STORAGE_URL_SETTING = "TIGHTROPE_STORAGE_URL"
ENDPOINT_SETTING = "TIGHTROPE_STORAGE_ENDPOINT_URL"


class StorageError(Exception):
    """A failure of the object store, with a message that says what to look at."""


class StorageUnavailable(StorageError):
    """The store cannot be reached or answers with a server error: nothing was written; the
    same operation may succeed later."""


class StorageFull(StorageError):
    """The store has no room (a full disk, a quota): an operator must make room."""


class StorageRefused(StorageError):
    """The store refuses this service: wrong credentials, a missing bucket, access denied."""


class ObjectMissing(StorageError, KeyError):
    """No object under this key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ObjectCorrupt(StorageError):
    """An object whose bytes do not have the sha256 it was stored with."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # quoted, strong: "<sha256>" when known, else the backend's own
    modified: datetime
    sha256: str | None = None  # recorded at write (S3 metadata); None when not known


def _check_key(key: str) -> str:
    """A relative POSIX key without `.`/`..` segments (never outside the store's root)."""
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or any(p in (".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"not a storage key: {key!r}")
    return key


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_checked(source: Path, dest: Path, sha256: str | None, corrupt: str) -> None:
    """Copy `source` to `dest` through a hidden temporary file beside it, renamed into place
    only when the bytes have `sha256` (when given); else ObjectCorrupt(`corrupt`)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".partial-{dest.name}-")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, open(source, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
        if sha256 is not None and h.hexdigest() != sha256:
            raise ObjectCorrupt(corrupt)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


class ObjectStore(ABC):
    """Objects under keys (`blobs/ab/ab…`, `artifacts/<audit>/<name>`); `child(prefix)` is the
    same store seen from a sub-prefix."""

    description: str

    @abstractmethod
    def child(self, prefix: str) -> ObjectStore: ...

    @abstractmethod
    def put_file(self, key: str, source: Path, sha256: str | None = None) -> ObjectInfo:
        """Store the file's bytes under `key`, atomically (replacing an older object).
        `sha256`: the digest the caller already knows (checked against the bytes sent)."""

    @abstractmethod
    def get_file(self, key: str, dest: Path, sha256: str | None = None) -> None:
        """Write the object to `dest` (atomically: a temporary file renamed into place), checked
        against `sha256`, else against the digest recorded at write."""

    @abstractmethod
    def read_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """The object's bytes, checked like get_file."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, validator and recorded sha256; None when there is none."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    @abstractmethod
    def open_stream(self, key: str, start: int = 0) -> BinaryIO:
        """A file-like reader of the object from byte `start` (the caller closes it)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; no error if it is gone already."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under `prefix/`."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix/` (all of them for ""), keys relative to this store."""

    def local_path(self, key: str) -> Path | None:
        """The object's own file where the store is a local directory (served with sendfile),
        else None."""
        return None

    def presigned_url(
        self, key: str, seconds: int, *, media_type: str, filename: str | None = None
    ) -> str | None:
        """A URL that lets its holder GET the object for `seconds`, answered with this media
        type (and as an attachment named `filename`); None where the store has none."""
        return None

    @abstractmethod
    def check(self) -> None:
        """Raise a StorageError with a message naming the setting when the store cannot be
        used (the gateway and the workers check at start)."""


class LocalObjectStore(ObjectStore):
    """A directory: the object `k` is the file `<root>/k`. Writes go to a hidden temporary file
    in the target's directory and are renamed into place. The sha256 is not recorded beside
    the file: a read without an expected digest trusts the local disk, as before."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"the directory {root}"

    def child(self, prefix: str) -> LocalObjectStore:
        return LocalObjectStore(self.root / _check_key(prefix))

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def put_file(self, key: str, source: Path, sha256: str | None = None) -> ObjectInfo:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        _copy_checked(source, final, sha256, f"{source} changed while it was stored under {key}")
        info = self.head(key)
        assert info is not None
        return info

    def move_in(self, key: str, source: Path) -> None:
        """Rename a file of the same filesystem into place (an upload staged beside it)."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, final)

    def get_file(self, key: str, dest: Path, sha256: str | None = None) -> None:
        source = self.path(key)
        if not source.is_file():
            raise ObjectMissing(f"no object {key} in {self.description}")
        _copy_checked(source, dest, sha256, f"the object {key} does not have its sha256 {sha256}")

    def read_bytes(self, key: str, sha256: str | None = None) -> bytes:
        try:
            data = self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectMissing(f"no object {key} in {self.description}") from None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ObjectCorrupt(f"the object {key} does not have its sha256 {sha256}")
        return data

    def head(self, key: str) -> ObjectInfo | None:
        path = self.path(key)
        try:
            if path.is_symlink() or not path.is_file():
                return None
            stat = path.stat()
        except OSError:
            return None
        etag = hashlib.md5(f"{stat.st_mtime}-{stat.st_size}".encode(), usedforsecurity=False)
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            etag=f'"{etag.hexdigest()}"',
            modified=datetime.fromtimestamp(stat.st_mtime, UTC),
        )

    def open_stream(self, key: str, start: int = 0) -> BinaryIO:
        try:
            f = open(self.path(key), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise ObjectMissing(f"no object {key} in {self.description}") from None
        f.seek(start)
        return f

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for directory, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                if name.startswith(".partial-"):
                    continue
                key = (Path(directory) / name).relative_to(self.root).as_posix()
                info = self.head(key)
                if info is not None:
                    yield info

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


# --- S3 -----------------------------------------------------------------------------------


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {}) if isinstance(response, dict) else {}
    return str(error.get("Code", ""))


def _http_status(exc: Exception) -> int:
    response = getattr(exc, "response", None) or {}
    meta = response.get("ResponseMetadata", {}) if isinstance(response, dict) else {}
    return int(meta.get("HTTPStatusCode", 0) or 0)


_FULL_CODES = {"InsufficientStorage", "QuotaExceeded", "XMinioStorageFull", "EntityTooLarge"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
    "403",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3ObjectStore(ObjectStore):
    """A bucket and a key prefix of an S3-compatible service (AWS S3, MinIO, Ceph, GCS's
    interoperability API), through boto3: credentials from the usual chain (environment,
    shared files, instance roles), `endpoint_url` for a service other than AWS."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        multipart_threshold: int = 64 * 1024 * 1024,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.multipart_threshold = multipart_threshold
        where = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.description = where + (f" at {endpoint}" if endpoint else "")

    def child(self, prefix: str) -> S3ObjectStore:
        return S3ObjectStore(
            self.client,
            self.bucket,
            self._key(_check_key(prefix)),
            endpoint=self.endpoint,
            multipart_threshold=self.multipart_threshold,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, exc: Exception, what: str) -> StorageError:
        """A boto3/botocore exception as the StorageError that says what to do about it."""
        from botocore import exceptions as bx

        code = _error_code(exc)
        status = _http_status(exc)
        if code == "NoSuchBucket" or (what == "check" and status == 404):
            return StorageRefused(
                f"the bucket {self.bucket!r} does not exist at "
                f"{self.endpoint or 'AWS S3'} ({STORAGE_URL_SETTING}={self._url()}; "
                f"create it, or fix the setting)"
            )
        if code in _CREDENTIAL_CODES or status == 403 or isinstance(exc, bx.NoCredentialsError):
            return StorageRefused(
                f"{self.description} refused this service's credentials while trying to "
                f"{what} ({code or status or type(exc).__name__}): check AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY (or the profile/role of the credential chain) and the "
                f"bucket's policy for {STORAGE_URL_SETTING}={self._url()}"
            )
        if code in _FULL_CODES or status == 507:
            return StorageFull(f"{self.description} has no room left ({code or status})")
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionError | bx.HTTPClientError):
            return StorageUnavailable(
                f"{self.description} cannot be reached to {what}: {exc} "
                f"(check {ENDPOINT_SETTING} and the network)"
            )
        if isinstance(exc, bx.ClientError) and status >= 500:
            return StorageUnavailable(f"{self.description} failed to {what}: {code} ({status})")
        if isinstance(exc, bx.BotoCoreError | bx.ClientError):
            return StorageUnavailable(f"{self.description} failed to {what}: {exc}")
        if isinstance(exc, OSError | TimeoutError):  # a stream cut mid-read
            return StorageUnavailable(f"{self.description} failed to {what}: {exc}")
        raise exc

    def _url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def put_file(self, key: str, source: Path, sha256: str | None = None) -> ObjectInfo:
        from boto3.s3.transfer import TransferConfig

        _check_key(key)
        digest = _sha256_of(source)
        if sha256 is not None and digest != sha256:
            raise ObjectCorrupt(f"{source} changed while it was stored under {key}")
        # ChecksumAlgorithm: S3 checks each part's SHA-256 on upload and records the object's;
        # the whole file's sha256 rides along as metadata, which every read is checked against.
        # A multipart upload (above the threshold) is published only by its completion;
        # s3transfer aborts it on any failure, so no half object is ever visible.
        config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=max(self.multipart_threshold // 2, 5 * 1024 * 1024),
            use_threads=False,
        )
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {SHA256_METADATA: digest}}
        try:
            self.client.upload_file(
                str(source), self.bucket, self._key(key), ExtraArgs=extra, Config=config
            )
        except Exception as exc:
            raise self._translate(_unwrap(exc), f"write {key}") from exc
        size = source.stat().st_size
        return ObjectInfo(key, size, f'"{digest}"', datetime.now(UTC), digest)

    def _get(self, key: str, what: str, **kwargs: Any) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kwargs)
        except Exception as exc:
            if _error_code(exc) in _MISSING_CODES or _error_code(exc) == "NoSuchKey":
                raise ObjectMissing(f"no object {key} in {self.description}") from None
            if _error_code(exc) == "InvalidRange":
                raise ObjectMissing(f"the range asked of {key} is outside it") from None
            raise self._translate(exc, what) from exc

    def _expected(self, key: str, response: dict[str, Any], sha256: str | None) -> str | None:
        recorded = (response.get("Metadata") or {}).get(SHA256_METADATA)
        if sha256 is not None and recorded is not None and recorded != sha256:
            raise ObjectCorrupt(f"the object {key} records sha256 {recorded}, not {sha256}")
        return sha256 or recorded

    def get_file(self, key: str, dest: Path, sha256: str | None = None) -> None:
        response = self._get(key, f"read {key}")
        expected = self._expected(key, response, sha256)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".partial-{dest.name}-")
        try:
            h = hashlib.sha256()
            body = response["Body"]
            try:
                with os.fdopen(fd, "wb") as out:
                    for chunk in iter(lambda: body.read(CHUNK), b""):
                        h.update(chunk)
                        out.write(chunk)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise  # the local disk, not the store: the caller's storage-full
                raise self._translate(exc, f"read {key}") from exc
            except Exception as exc:
                raise self._translate(exc, f"read {key}") from exc
            finally:
                body.close()
            if expected is not None and h.hexdigest() != expected:
                raise ObjectCorrupt(
                    f"the object {key} of {self.description} is corrupt: its bytes have sha256 "
                    f"{h.hexdigest()}, not {expected}"
                )
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_bytes(self, key: str, sha256: str | None = None) -> bytes:
        response = self._get(key, f"read {key}")
        expected = self._expected(key, response, sha256)
        try:
            data = bytes(response["Body"].read())
        except Exception as exc:
            raise self._translate(exc, f"read {key}") from exc
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ObjectCorrupt(f"the object {key} of {self.description} is corrupt")
        return data

    def head(self, key: str) -> ObjectInfo | None:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._key(_check_key(key)))
        except Exception as exc:
            if _error_code(exc) in _MISSING_CODES or _http_status(exc) == 404:
                if _error_code(exc) == "NoSuchBucket":
                    raise self._translate(exc, f"read {key}") from exc
                return None
            raise self._translate(exc, f"read {key}") from exc
        sha256 = (response.get("Metadata") or {}).get(SHA256_METADATA)
        return ObjectInfo(
            key=key,
            size=int(response["ContentLength"]),
            etag=f'"{sha256}"' if sha256 else str(response.get("ETag", "")),
            modified=response.get("LastModified") or datetime.now(UTC),
            sha256=sha256,
        )

    def open_stream(self, key: str, start: int = 0) -> BinaryIO:
        kwargs = {"Range": f"bytes={start}-"} if start else {}
        response = self._get(key, f"read {key}", **kwargs)
        body: BinaryIO = response["Body"]
        return body

    def presigned_url(
        self, key: str, seconds: int, *, media_type: str, filename: str | None = None
    ) -> str | None:
        params = {
            "Bucket": self.bucket,
            "Key": self._key(_check_key(key)),
            "ResponseContentType": media_type,
        }
        if filename is not None:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        try:  # signed locally: no request to the store
            url: str = self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=seconds
            )
        except Exception as exc:
            raise self._translate(exc, f"sign a URL of {key}") from exc
        return url

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(_check_key(key)))
        except Exception as exc:
            raise self._translate(exc, f"delete {key}") from exc

    def delete_prefix(self, prefix: str) -> None:
        keys = [{"Key": self._key(info.key)} for info in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            try:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000], "Quiet": True}
                )
            except Exception as exc:
                raise self._translate(exc, f"delete {prefix}/") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key(_check_key(prefix)) + "/" if prefix else (self.prefix + "/").lstrip("/")
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        key=item["Key"][strip:],
                        size=int(item["Size"]),
                        etag=str(item.get("ETag", "")),
                        modified=item["LastModified"],
                    )
        except Exception as exc:
            raise self._translate(exc, f"list {prefix or '/'}") from exc

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._translate(exc, "check") from exc


def _unwrap(exc: Exception) -> Exception:
    """s3transfer wraps a failed upload's ClientError in its own S3UploadFailedError."""
    cause = exc.__cause__ or exc.__context__
    if type(exc).__name__ == "S3UploadFailedError" and isinstance(cause, Exception):
        return cause
    return exc


# --- from the settings --------------------------------------------------------------------

_clients: dict[tuple[str | None, ...], Any] = {}
_clients_lock = threading.Lock()


def parse_storage_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` as (bucket, prefix); ValueError naming the setting otherwise."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(
            f"{STORAGE_URL_SETTING} must be empty (the data directory) or s3://bucket[/prefix], "
            f"not {url!r}"
        )
    return parsed.netloc, parsed.path.strip("/")


def s3_client(endpoint_url: str | None, region: str | None) -> Any:
    """One boto3 client per endpoint and region in this process (clients are thread-safe)."""
    import boto3
    from botocore.config import Config

    # the credential chain's environment is part of the key: a process that changes it (a
    # test, a CLI run with other credentials) gets a client that uses the new values
    chain = tuple(
        os.environ.get(name)
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
        )
    )
    cache_key = (endpoint_url, region, *chain)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            config = Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                # checksums only where an operation requires or the caller asks for them:
                # some S3-compatible services refuse the trailing checksums of newer clients
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                # SigV4 for every request and presigned URL (storage_presign_seconds): what
                # every S3-compatible service accepts; botocore presigns with SigV2 otherwise
                signature_version="s3v4",
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url or None, region_name=region, config=config
            )
            _clients[cache_key] = client
        return client


def object_store(settings: Settings) -> ObjectStore:
    """The store the settings name: the data directory, or the bucket and prefix."""
    if not settings.storage_url:
        return LocalObjectStore(settings.data_dir)
    bucket, prefix = parse_storage_url(settings.storage_url)
    client = s3_client(settings.storage_endpoint_url, settings.storage_region)
    return S3ObjectStore(
        client,
        bucket,
        prefix,
        endpoint=settings.storage_endpoint_url,
        multipart_threshold=settings.storage_multipart_threshold,
    )
