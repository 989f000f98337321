"""The object store's two backends (service/storage/objects.py): the data directory and an
S3 bucket on a real S3-protocol server (moto's, over a loopback socket). Writes are atomic
(a multipart upload cut mid-way leaves no object, and not a part of one), reads are checked
against the sha256, and a missing bucket, wrong credentials or an unreachable store are
errors that name the setting to fix."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from service.settings import Settings
from service.storage.objects import (
    LocalObjectStore,
    ObjectCorrupt,
    ObjectMissing,
    ObjectStore,
    S3ObjectStore,
    StorageRefused,
    StorageUnavailable,
    object_store,
)
from tests.fixtures.s3_server import CREDENTIALS_ENV, REGION, MotoServer, StoreLink, moto_server
from workers.cli.stack import free_port

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def s3_server() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def s3_settings(tmp_path: Path, endpoint: str, bucket: str, prefix: str = "tr") -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        storage_url=f"s3://{bucket}/{prefix}",
        storage_endpoint_url=endpoint,
        storage_region=REGION,
        storage_multipart_threshold=5 * MIB,
    )


@pytest.fixture(params=["local", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, credentials: None
) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield object_store(Settings(data_dir=tmp_path / "data"))
        return
    server: MotoServer = request.getfixturevalue("s3_server")
    store = object_store(s3_settings(tmp_path, server.endpoint_url, server.new_bucket()))
    assert isinstance(store, S3ObjectStore)
    yield store


def write(path: Path, data: bytes) -> tuple[Path, str]:
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_put_get_head_list_delete(store: ObjectStore, tmp_path: Path) -> None:
    store.check()
    source, digest = write(tmp_path / "model.pt", b"weights" * 1000)
    info = store.put_file(f"blobs/{digest[:2]}/{digest}", source, digest)
    assert info.size == 7000
    head = store.head(f"blobs/{digest[:2]}/{digest}")
    assert head is not None and head.size == 7000 and head.etag.startswith('"')
    assert store.exists(f"blobs/{digest[:2]}/{digest}")
    assert store.head("blobs/00/nothing") is None

    dest = tmp_path / "copy"
    store.get_file(f"blobs/{digest[:2]}/{digest}", dest, digest)
    assert dest.read_bytes() == b"weights" * 1000
    assert store.read_bytes(f"blobs/{digest[:2]}/{digest}", digest) == b"weights" * 1000
    with pytest.raises(ObjectMissing):
        store.read_bytes("blobs/00/nothing")
    with pytest.raises(ObjectMissing):
        store.get_file("blobs/00/nothing", tmp_path / "never")
    assert not (tmp_path / "never").exists()

    artifacts = store.child("artifacts")
    for name in ("report.json", "report.html"):
        artifacts.put_file(f"a1/{name}", source)
    artifacts.put_file("a2/figure.png", source)
    assert [i.key for i in artifacts.list("a1")] == ["a1/report.html", "a1/report.json"]
    assert [i.key for i in store.list("artifacts")] == [
        "artifacts/a1/report.html",
        "artifacts/a1/report.json",
        "artifacts/a2/figure.png",
    ]
    artifacts.delete_prefix("a1")
    assert [i.key for i in artifacts.list()] == ["a2/figure.png"]
    artifacts.delete("a2/figure.png")
    artifacts.delete("a2/figure.png")  # gone already: no error
    assert list(artifacts.list()) == []
    with pytest.raises(ValueError):
        store.head("../outside")


def test_ranged_stream(store: ObjectStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    source, digest = write(tmp_path / "arr.npy", data)
    store.put_file("artifacts/a/arr.npy", source, digest)
    with store.open_stream("artifacts/a/arr.npy", 1000) as stream:
        assert stream.read(24) == data[1000:1024]
    with store.open_stream("artifacts/a/arr.npy") as stream:
        assert stream.read() == data


def test_a_file_changed_while_stored_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    source, digest = write(tmp_path / "f", b"one")
    source.write_bytes(b"two")
    with pytest.raises(ObjectCorrupt):
        store.put_file("blobs/x", source, digest)
    assert store.head("blobs/x") is None


def test_a_corrupted_object_is_detected_on_every_read(
    s3_server: MotoServer, tmp_path: Path, credentials: None
) -> None:
    bucket = s3_server.new_bucket()
    store = object_store(s3_settings(tmp_path, s3_server.endpoint_url, bucket))
    source, digest = write(tmp_path / "model.pt", b"the admitted bytes")
    store.put_file("blobs/m", source, digest)
    # Someone (a bad disk, a bad copy) changes the bytes behind the service's back, keeping
    # the recorded sha256.
    s3_server.client().put_object(
        Bucket=bucket, Key="tr/blobs/m", Body=b"other bytes!", Metadata={"sha256": digest}
    )
    dest = tmp_path / "copy"
    with pytest.raises(ObjectCorrupt, match="corrupt"):
        store.get_file("blobs/m", dest)
    assert not dest.exists() and not list(tmp_path.glob(".partial-*"))
    with pytest.raises(ObjectCorrupt):
        store.read_bytes("blobs/m")
    with pytest.raises(ObjectCorrupt):  # the caller's digest, whatever the metadata says
        store.get_file("blobs/m", dest, hashlib.sha256(b"other bytes!").hexdigest())

    local = LocalObjectStore(tmp_path / "local")
    local.put_file("blobs/m", source, digest)
    (tmp_path / "local" / "blobs" / "m").write_bytes(b"flipped")
    with pytest.raises(ObjectCorrupt):
        local.get_file("blobs/m", dest, digest)
    assert not dest.exists()


def test_multipart_upload_is_atomic(
    s3_server: MotoServer, tmp_path: Path, credentials: None
) -> None:
    """Above the threshold the file goes up in parts, published only by the completion: a
    reader sees no object while the parts go up, and a failed upload leaves none (nor replaces
    the older object under the key)."""
    bucket = s3_server.new_bucket()
    data = os.urandom(12 * MIB)
    source, digest = write(tmp_path / "big.pt", data)
    link = StoreLink(s3_server.port)
    try:
        settings = s3_settings(tmp_path, link.endpoint_url, bucket)
        store = object_store(settings)
        raw = s3_server.client()

        store.put_file("blobs/big", source, digest)
        head = raw.head_object(Bucket=bucket, Key="tr/blobs/big", ChecksumMode="ENABLED")
        assert head["ETag"].endswith('-3"')  # three parts: a multipart upload
        assert head.get("ChecksumSHA256")  # the server's own checksum, asked for on upload
        assert head["Metadata"]["sha256"] == digest
        dest = tmp_path / "back"
        store.get_file("blobs/big", dest, digest)
        assert dest.read_bytes() == data

        # Cut the store off after the first part of an overwrite: the upload fails, nothing
        # new is visible, the old object is intact.
        newer, newer_digest = write(tmp_path / "newer.pt", os.urandom(12 * MIB))
        link.cut_after(6 * MIB)
        with pytest.raises(StorageUnavailable, match="TIGHTROPE_STORAGE_ENDPOINT_URL"):
            store.put_file("blobs/big", newer, newer_digest)
        with pytest.raises(StorageUnavailable):
            store.put_file("blobs/other", newer, newer_digest)
        link.restore()
        assert store.head("blobs/other") is None
        assert raw.head_object(Bucket=bucket, Key="tr/blobs/big")["Metadata"]["sha256"] == digest
        store.get_file("blobs/big", dest, digest)
        assert dest.read_bytes() == data
    finally:
        link.cut()


def test_a_missing_bucket_names_the_setting(
    s3_server: MotoServer, tmp_path: Path, credentials: None
) -> None:
    store = object_store(s3_settings(tmp_path, s3_server.endpoint_url, "no-such-bucket"))
    with pytest.raises(StorageRefused) as refused:
        store.check()
    assert "no-such-bucket" in str(refused.value)
    assert "TIGHTROPE_STORAGE_URL=s3://no-such-bucket/tr" in str(refused.value)


def test_wrong_credentials_name_the_settings(tmp_path: Path, credentials: None) -> None:
    # A server that checks credentials: the first three calls (making a user, its key and
    # its policy) are allowed without; every later one needs that user's key.
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:
        iam = boto3.client(
            "iam", endpoint_url=server.endpoint_url, region_name=REGION, **_keys("x", "y")
        )
        iam.create_user(UserName="tightrope")
        key = iam.create_access_key(UserName="tightrope")["AccessKey"]
        iam.put_user_policy(
            UserName="tightrope",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        good = server.client(key=key["AccessKeyId"], secret=key["SecretAccessKey"])
        good.create_bucket(Bucket="guarded")
        settings = s3_settings(tmp_path, server.endpoint_url, "guarded")

        os.environ["AWS_ACCESS_KEY_ID"] = key["AccessKeyId"]
        os.environ["AWS_SECRET_ACCESS_KEY"] = key["SecretAccessKey"]
        object_store(settings).check()  # the right key: fine

        os.environ["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
        with pytest.raises(StorageRefused) as refused:
            object_store(settings).check()
        message = str(refused.value)
        assert "AWS_ACCESS_KEY_ID" in message and "TIGHTROPE_STORAGE_URL=s3://guarded" in message
        source, _ = write(tmp_path / "f", b"x")
        with pytest.raises(StorageRefused):
            object_store(settings).put_file("blobs/f", source)


def _keys(key: str, secret: str) -> dict[str, str]:
    return {"aws_access_key_id": key, "aws_secret_access_key": secret}


def test_an_unreachable_store_names_the_endpoint(tmp_path: Path, credentials: None) -> None:
    store = object_store(s3_settings(tmp_path, f"http://127.0.0.1:{free_port()}", "bkt"))
    with pytest.raises(StorageUnavailable, match="TIGHTROPE_STORAGE_ENDPOINT_URL"):
        store.check()
    with pytest.raises(StorageUnavailable):
        store.read_bytes("blobs/x")


def test_the_setting_chooses_the_backend(tmp_path: Path) -> None:
    local = object_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalObjectStore) and local.root == tmp_path
    with pytest.raises(ValueError, match="TIGHTROPE_STORAGE_URL"):
        Settings(data_dir=tmp_path, storage_url="https://bucket/prefix")
