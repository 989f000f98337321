"""A gateway and workers that share no directory, only PostgreSQL, Redis and an S3 bucket (moto's
S3 server on loopback, over a real socket), as on machines without a shared disk
(docs/deployment.md, "Workers on another machine"): every process has its own private data
directory, and blobs, reports and artifacts go through the bucket. The report is the one the
local-directory deployment gives; the store going away mid-audit loses nothing, fails nothing
and serves nothing half; the audit finishes once it is back.

All real: the HTTP gateway, supervised worker processes, Redis, PostgreSQL, the sandboxed
runner, boto3 against moto's server; `StoreLink` (tests/fixtures/s3_server.py) is the network
between them and the bucket, which the fault test cuts (moto keeps its objects in memory, so
the server itself stays up).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from service.db.tables import Artifact, Audit
from tests.fixtures.databases import postgres_database
from tests.fixtures.s3_server import CREDENTIALS_ENV, REGION, MotoServer, StoreLink, moto_server
from tests.integration.conftest import (
    MODEL_SPEC,
    client_for,
    shard_rows,
    upload_ready_model,
    wait_until,
)
from tests.integration.test_scale_out import (
    SLOW_CHECK,
    part_done,
    raw_report,
    sharded_request,
    without_run_identity,
)
from workers.cli.client import TightropeClient
from workers.cli.stack import LocalStack

pytestmark = pytest.mark.integration

PREFIX = "deploy"
IMAGES = 6  # the scale-out test's audit: one shard per image, a cheap check


@pytest.fixture(scope="module")
def s3_server() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


def storage_env(endpoint_url: str, bucket: str) -> dict[str, str]:
    return {
        **CREDENTIALS_ENV,
        "TIGHTROPE_STORAGE_URL": f"s3://{bucket}/{PREFIX}",
        "TIGHTROPE_STORAGE_ENDPOINT_URL": endpoint_url,
        "TIGHTROPE_STORAGE_REGION": REGION,
    }


def start_without_shared_disk(
    make_stack: Any,
    database_url: str,
    endpoint_url: str,
    bucket: str,
    workers: tuple[str, ...],
    **env: str,
) -> LocalStack:
    """The gateway, then the workers, each in its own data directory (<stack>/<name>). Like an
    operator of several machines, the test gives every worker the gateway's signing key and
    callback secret (a copy of its `signing/` into the worker's own directory): a worker with
    other ones refuses to start (service/storage/startup.py)."""
    stack: LocalStack = make_stack(
        database_url, workers=0, private_dirs=True, **storage_env(endpoint_url, bucket), **env
    )
    keys = stack.process_dir("api") / "signing"
    assert (keys / "ed25519.pem").is_file() and (keys / "callback-secret").is_file()
    for name in workers:
        shutil.copytree(keys, stack.process_dir(name) / "signing")
        stack.start_worker(name)
    stack.wait_for("/readyz", 180)
    return stack


def files_under(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def bucket_object(server: MotoServer, bucket: str, key: str) -> tuple[bytes, str | None]:
    """The object's bytes and the sha256 recorded with it, read from the bucket itself."""
    got = server.client().get_object(Bucket=bucket, Key=f"{PREFIX}/{key}")
    return got["Body"].read(), got["Metadata"].get("sha256")


def artifact_rows(stack: LocalStack, audit_id: str) -> dict[str, dict[str, Any]]:
    assert stack.database_url is not None
    engine = create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Artifact.__table__).where(Artifact.audit_id == audit_id)
            ).mappings()
            return {row["name"]: dict(row) for row in rows}
    finally:
        engine.dispose()


def audit_row(stack: LocalStack, audit_id: str) -> dict[str, Any]:
    assert stack.database_url is not None
    engine = create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(Audit.__table__).where(Audit.id == audit_id)).mappings()
            return dict(row.one())
    finally:
        engine.dispose()


def upload_response(client: TightropeClient, model_file: Path) -> Any:
    with open(model_file, "rb") as f:
        return client._http.post(
            "/v1/models",
            files={"file": (model_file.name, f, "application/octet-stream")},
            data={"spec": json.dumps(MODEL_SPEC)},
        )


def assert_storage_unavailable(response: Any, what: str) -> None:
    """503 `storage-unavailable` with Retry-After: never a 200 with part of a file."""
    assert response.status_code == 503, (what, response.status_code, response.text[:300])
    assert response.json()["type"].endswith("/storage-unavailable"), (what, response.text)
    assert int(response.headers["Retry-After"]) > 0, what


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.timeout(600)  # two stacks, two audits of 6 sandboxed shards, on 2 loaded cores
def test_a_gateway_and_two_workers_without_a_shared_disk_give_the_local_report(
    database_url: str, make_stack: Any, model_file: Path, s3_server: MotoServer
) -> None:
    # (database_url first: its database is dropped after the stack using it has stopped)
    # The local-directory deployment first: one data directory for the gateway and its worker.
    with postgres_database("t") as local_database:
        local = make_stack(local_database)
        try:
            with client_for(local) as client:
                model_id = upload_ready_model(client, model_file)
                done = client.wait_audit(
                    client.submit_audit(sharded_request(model_id, IMAGES))["id"], timeout=300
                )
                assert done["status"] == "succeeded", done.get("error")
                local_report = raw_report(client, done["id"])
                local_model_id = model_id
                local_artifacts = files_under(local.data_dir / "artifacts" / done["id"])
        finally:
            local.stop()  # its worker reads the Redis queues the next stack's gateway sends to

    bucket = s3_server.new_bucket()
    stack = start_without_shared_disk(
        make_stack, database_url, s3_server.endpoint_url, bucket, ("worker0", "worker1")
    )
    with client_for(stack) as client:
        model_id = upload_ready_model(client, model_file)
        status = client.wait_audit(
            client.submit_audit(sharded_request(model_id, IMAGES))["id"], timeout=300
        )
        assert status["status"] == "succeeded", status.get("error")
        audit_id = status["id"]
        assert status["shards"]["done"] == status["shards"]["total"] >= IMAGES
        workers = {row["worker"].split("@")[0] for row in shard_rows(stack, audit_id)}
        assert workers == {"worker0-cpu1", "worker1-cpu1"}, workers  # both ran shards

        # The same report as the local run, but for the run's own identity and the model's id
        # (each deployment gave the upload its own; the model's sha256 is the same).
        report = raw_report(client, audit_id)
        assert model_id in without_run_identity(report)
        assert without_run_identity(report).replace(model_id, local_model_id) == (
            without_run_identity(local_report)
        )

        # Served by the gateway from the bucket: the bytes of the object, all of them.
        stored, sha256 = bucket_object(s3_server, bucket, f"artifacts/{audit_id}/report.json")
        assert report == stored and hashlib.sha256(report).hexdigest() == sha256
        rows = artifact_rows(stack, audit_id)
        assert sorted(rows) == local_artifacts  # the files the local run kept, no more or less
        for name, row in rows.items():
            response = client._http.get(f"/v1/audits/{audit_id}/artifacts/{name}")
            assert response.status_code == 200, (name, response.text[:300])
            stored, sha256 = bucket_object(s3_server, bucket, f"artifacts/{row['path']}")
            assert response.content == stored, name
            assert hashlib.sha256(stored).hexdigest() == sha256 == row["sha256"], name
            assert response.headers["ETag"] == f'"{sha256}"', name
        assert (
            client.get_report_file(audit_id, "report.html")
            == bucket_object(s3_server, bucket, f"artifacts/{audit_id}/report.html")[0]
        )

    # Nothing went through a shared directory: each process kept only its own scratch.
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    model_sha = next(k for k in keys if k.startswith(f"{PREFIX}/blobs/")).rsplit("/", 1)[1]
    assert keys == {
        f"{PREFIX}/signing/published-keys.json",
        f"{PREFIX}/blobs/{model_sha[:2]}/{model_sha}",
        *(f"{PREFIX}/artifacts/{audit_id}/{name}" for name in rows),
    }
    gateway = files_under(stack.process_dir("api"))
    assert gateway == ["signing/callback-secret", "signing/ed25519.pem"], gateway  # no job dirs
    for name in ("worker0", "worker1"):
        own = stack.process_dir(name)
        # the model, downloaded from the bucket into the worker's cache; no blob store of its
        # own, no artifacts (they went to the bucket), no file of the gateway's
        assert files_under(own / "blob-cache") == [f"{model_sha[:2]}/{model_sha}"], name
        assert files_under(own / "blobs") == [] and files_under(own / "artifacts") == [], name
    assert sorted(p.name for p in stack.data_dir.iterdir()) == [
        "api",
        "logs",
        "worker0",
        "worker1",
    ]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.timeout(600)
def test_the_store_unreachable_mid_audit_loses_nothing_and_serves_nothing_half(
    database_url: str, make_stack: Any, model_file: Path, s3_server: MotoServer
) -> None:
    """The bucket becomes unreachable while the shards run, and stays away while the audit
    finalises: the finalising step cannot store the report and is given back (queued, its
    attempt not spent, the audit not failed); uploads and downloads meanwhile are 503
    `storage-unavailable` with Retry-After; once the store is back the audit finishes with all
    its shards and every artifact whole. The shard step's and the admission's own give-backs
    are in tests/workers/execution/test_storage_waits.py, where the outage can be timed."""
    bucket = s3_server.new_bucket()
    link = StoreLink(s3_server.port)
    try:
        # One attempt per step: a give-back that spent the attempt would fail the audit at its
        # next try ("gave up after 1 attempts"), so the audit succeeding proves none was spent.
        stack = start_without_shared_disk(
            make_stack,
            database_url,
            link.endpoint_url,
            bucket,
            ("worker0",),
            TIGHTROPE_MAX_ATTEMPTS="1",
        )
        with client_for(stack) as client:
            model_id = upload_ready_model(client, model_file)
            audit_id = client.submit_audit(sharded_request(model_id, 4, check=SLOW_CHECK))["id"]
            part_done(client, audit_id)
            link.cut()

            # An upload meanwhile is refused whole: no model row, nothing in the bucket.
            assert_storage_unavailable(upload_response(client, model_file), "an upload")
            models = client._http.get("/v1/models").json()["items"]
            assert [m["id"] for m in models] == [model_id]

            # The shards go on from the worker's job directory; the finalising step cannot
            # store the report and gives the audit back: queued, all its shards stored.
            def given_back() -> bool:
                row = audit_row(stack, audit_id)
                assert row["status"] in ("queued", "running"), row["error"]
                return row["status"] == "queued" and row["shards_done"] == row["shards_total"]

            wait_until(given_back, 240, "the finalising step given back", poll=0.1)
            # Nothing of the report is served or listed while it is not all stored.
            for name in ("report", "report.html"):
                response = client._http.get(f"/v1/audits/{audit_id}/{name}")
                assert response.status_code == 409, (name, response.text)
                assert response.json()["type"].endswith("/report-not-ready")
            assert artifact_rows(stack, audit_id) == {}
            assert client.get_audit(audit_id)["status"] in ("queued", "running")

            link.restore()
            final = client.wait_audit(audit_id, timeout=240)
            assert final["status"] == "succeeded", final.get("error")
            assert final["attempts"] == 1  # no step spent an attempt on the outage
            assert final["shards"]["done"] == final["shards"]["total"] == 4
            shards = shard_rows(stack, audit_id)
            assert [(row["status"], row["attempts"]) for row in shards] == [("done", 1)] * 4
            report = raw_report(client, audit_id)
            assert json.loads(report)["checks"][0]["images"] == 4
            rows = artifact_rows(stack, audit_id)
            assert {"report.json", "report.html"} <= set(rows)
            for name, row in rows.items():  # every artifact whole, as recorded
                stored, sha256 = bucket_object(s3_server, bucket, f"artifacts/{row['path']}")
                assert hashlib.sha256(stored).hexdigest() == sha256 == row["sha256"], name
                assert len(stored) == row["size_bytes"], name

            # Away again: a download is refused (503, Retry-After), never a 200 cut short.
            link.cut()
            for path in ("report", "report.html", "report.junit.xml", "artifacts/report.json"):
                assert_storage_unavailable(client._http.get(f"/v1/audits/{audit_id}/{path}"), path)
            link.restore()
            assert raw_report(client, audit_id) == report
    finally:
        link.cut()
