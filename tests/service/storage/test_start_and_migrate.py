"""The object store from the command line, against a real S3-protocol server (moto's, on
loopback): `tightrope storage migrate` copies and verifies a data directory and is safe to run
twice; `tightrope serve` and `tightrope worker` refuse to start on a missing bucket, wrong
credentials or a signing key that is not the gateway's, naming the setting; and a worker's
blob cache downloads a blob once, checks it before every reuse and stays within its size."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings
from service.storage.objects import object_store
from service.storage.startup import PUBLISHED_KEYS, StartRefused, check_worker_start, publish_keys
from service.storage.stores import BlobStore, blob_store
from tests.fixtures.s3_server import CREDENTIALS_ENV, REGION, MotoServer, moto_server
from workers.execution.blob_cache import BlobCache, BlobMissing


@pytest.fixture(scope="module")
def s3_server() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)


def env_for(data_dir: Path, server: MotoServer, bucket: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIGHTROPE_", "AWS_"))}
    return {
        **env,
        **CREDENTIALS_ENV,
        "TIGHTROPE_DATA_DIR": str(data_dir),
        "TIGHTROPE_STORAGE_URL": f"s3://{bucket}/deploy",
        "TIGHTROPE_STORAGE_ENDPOINT_URL": server.endpoint_url,
        "TIGHTROPE_STORAGE_REGION": REGION,
        **extra,
    }


def tightrope(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def settings_for(data_dir: Path, server: MotoServer, bucket: str, **extra: object) -> Settings:
    return Settings(
        data_dir=data_dir,
        storage_url=f"s3://{bucket}/deploy",
        storage_endpoint_url=server.endpoint_url,
        storage_region=REGION,
        **extra,  # type: ignore[arg-type]
    )


def test_migrate_copies_verifies_and_is_safe_to_run_twice(
    s3_server: MotoServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    blobs = BlobStore(data / "blobs")
    digest, _, _ = blobs.put_bytes(b"model bytes")
    (data / "artifacts" / "a1").mkdir(parents=True)
    (data / "artifacts" / "a1" / "report.json").write_text('{"verdict": "pass"}')
    (data / "artifacts" / "a1" / "figure.png").write_bytes(b"\x89PNG")
    (data / "blobs" / "tmp" / "upload-half").write_bytes(b"staging, not data")
    bucket = s3_server.new_bucket()
    env = env_for(data, s3_server, bucket)

    first = tightrope(env, "storage", "migrate")
    assert first.returncode == 0, first.stderr
    assert "3 copied" in first.stdout and "0 already" in first.stdout
    raw = s3_server.client()
    keys = sorted(o["Key"] for o in raw.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [
        "deploy/artifacts/a1/figure.png",
        "deploy/artifacts/a1/report.json",
        f"deploy/blobs/{digest[:2]}/{digest}",
    ]
    head = raw.head_object(Bucket=bucket, Key=f"deploy/blobs/{digest[:2]}/{digest}")
    assert head["Metadata"]["sha256"] == digest

    # An object damaged in the bucket since: the second run finds it and copies it again.
    raw.put_object(
        Bucket=bucket,
        Key="deploy/artifacts/a1/figure.png",
        Body=b"damaged",
        Metadata={"sha256": hashlib.sha256(b"\x89PNG").hexdigest()},
    )
    second = tightrope(env, "storage", "migrate")
    assert second.returncode == 0, second.stderr
    assert "1 copied" in second.stdout and "2 already there and verified" in second.stdout
    body = raw.get_object(Bucket=bucket, Key="deploy/artifacts/a1/figure.png")["Body"].read()
    assert body == b"\x89PNG"

    # A blob whose bytes are not its name is reported, not copied.
    (data / "blobs" / digest[:2] / digest).write_bytes(b"flipped")
    third = tightrope(env, "storage", "migrate")
    assert third.returncode == 1
    assert "do not have the sha256" in third.stderr


def test_serve_and_worker_refuse_a_missing_bucket(s3_server: MotoServer, tmp_path: Path) -> None:
    env = env_for(tmp_path / "data", s3_server, "no-such-bucket")
    for command in (["serve", "--port", "1"], ["worker", "--concurrency", "0"]):
        refused = tightrope(env, *command)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        message = " ".join(refused.stderr.split())
        assert "cannot start" in message and "no-such-bucket" in message
        assert "TIGHTROPE_STORAGE_URL=s3://no-such-bucket/deploy" in message


def test_a_worker_with_another_signing_key_refuses_to_start(
    s3_server: MotoServer, tmp_path: Path, credentials: None
) -> None:
    bucket = s3_server.new_bucket()
    gateway = settings_for(tmp_path / "gateway", s3_server, bucket, callback_secret="s3cret")
    publish_keys(gateway, object_store(gateway))
    assert object_store(gateway).exists(PUBLISHED_KEYS)

    # Its own data directory and no key given: it would generate its own key.
    alone = env_for(tmp_path / "worker", s3_server, bucket, TIGHTROPE_CALLBACK_SECRET="s3cret")
    refused = tightrope(alone, "worker", "--concurrency", "0")
    assert refused.returncode == 2
    message = " ".join(refused.stderr.split())
    assert "TIGHTROPE_SIGNING_KEY_PATH" in message and "gateway publishes the key" in message

    # The gateway's key file, but another callback secret.
    key_file = tmp_path / "gateway" / "signing" / "ed25519.pem"
    worker = settings_for(
        tmp_path / "worker", s3_server, bucket, signing_key_path=key_file, callback_secret="other"
    )
    with pytest.raises(StartRefused, match="TIGHTROPE_CALLBACK_SECRET"):
        check_worker_start(worker)
    # Both the gateway's (the secret from a file, as a secret file every machine is given).
    secret_file = tmp_path / "callback-secret"
    secret_file.write_text("s3cret\n")
    check_worker_start(
        settings_for(
            tmp_path / "worker",
            s3_server,
            bucket,
            signing_key_path=key_file,
            callback_secret_path=secret_file,
        )
    )


def test_the_blob_cache_downloads_once_rechecks_and_evicts(
    s3_server: MotoServer, tmp_path: Path, credentials: None
) -> None:
    settings = settings_for(tmp_path / "gateway", s3_server, s3_server.new_bucket())
    store = blob_store(settings)
    digests = []
    for i in range(3):
        staged = tmp_path / f"blob{i}"
        staged.write_bytes(bytes([i]) * 1000)
        digest = hashlib.sha256(staged.read_bytes()).hexdigest()
        store.commit_staged(staged, digest)
        digests.append(digest)
    worker_store = blob_store(settings_for(tmp_path / "worker", s3_server, store.objects.bucket))  # type: ignore[attr-defined]
    cache = BlobCache(tmp_path / "worker" / "blob-cache", worker_store, max_bytes=2500)

    cache.copy_to(digests[0], tmp_path / "job-a.pt")
    cache.copy_to(digests[0], tmp_path / "job-b.pt")  # a second shard: nothing downloaded
    assert (cache.downloads, cache.hits) == (1, 1)
    assert (tmp_path / "job-b.pt").read_bytes() == bytes([0]) * 1000

    cached = cache.root / digests[0][:2] / digests[0]
    cached.write_bytes(b"changed by someone")  # damaged: fetched again, never used
    cache.copy_to(digests[0], tmp_path / "job-c.pt")
    assert cache.downloads == 2
    assert (tmp_path / "job-c.pt").read_bytes() == bytes([0]) * 1000

    os.utime(cached, (1, 1))  # the least recently used
    cache.copy_to(digests[1], tmp_path / "job-d.pt")
    cache.copy_to(digests[2], tmp_path / "job-e.pt")  # 3000 bytes > 2500: one goes
    assert not cached.exists()
    assert sorted(p.name for p in cache.root.glob("*/*")) == sorted(digests[1:])

    with pytest.raises(BlobMissing):
        cache.copy_to("0" * 64, tmp_path / "never.pt")
