"""The steps of a worker when the object store is away, in process, on real databases, against a
real S3-protocol server (moto's, on loopback) behind `StoreLink`, the network the test cuts:
a shard, a plan, a finalising step and an admission that cannot reach the store are given back
without spending an attempt, however often it happens, and go on once it is back; a store that
refuses the workers (a missing bucket) or is full fails the audit with the named problem.

The runner children are real sandboxed processes running the fake runner modules of
tests/workers/fakes."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Artifact, Audit, AuditShard, Model
from service.settings import Settings
from service.storage.stores import blob_store
from tests.fixtures.s3_server import CREDENTIALS_ENV, REGION, MotoServer, StoreLink, moto_server
from tests.workers.conftest import add_audit, add_model
from tests.workers.execution.test_audit_job import Recorded
from tests.workers.execution.test_shard_job import CPU, planned_audit
from workers.cli.stack import free_port
from workers.execution.admission_job import execute_admission
from workers.execution.audit_job import execute_audit
from workers.execution.job_dir_cache import JobDirCache
from workers.execution.shard_job import execute_shard

pytestmark = pytest.mark.needs("bwrap")  # real sandboxed children

BLOB = b"not a model"  # add_model's default bytes: the model row's sha256


@pytest.fixture(scope="module")
def s3_server() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture
def link(s3_server: MotoServer) -> Iterator[StoreLink]:
    link = StoreLink(s3_server.port)
    yield link
    link.cut()


@pytest.fixture
def s3(
    settings: Settings, s3_server: MotoServer, link: StoreLink, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The settings of a worker whose store is a fresh bucket reached through `link`; the
    model bytes of add_model are in it (and only there: the local blob directory is not the
    store)."""
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.new_bucket()
    s3 = settings.model_copy(
        update={
            "storage_url": f"s3://{bucket}/t",
            "storage_endpoint_url": link.endpoint_url,
            "storage_region": REGION,
            "runner_module": "tests.workers.fakes.report",
        }
    )
    blob_store(s3).put_bytes(BLOB)
    return s3


def _audit(session: Session, audit_id: str) -> Audit:
    row = session.get(Audit, audit_id, populate_existing=True)
    assert row is not None
    return row


def _shards(session: Session, audit_id: str) -> list[AuditShard]:
    return list(
        session.scalars(
            select(AuditShard)
            .where(AuditShard.audit_id == audit_id)
            .order_by(AuditShard.position)
            .execution_options(populate_existing=True)
        )
    )


def _no_job_dirs(settings: Settings) -> bool:
    return not settings.jobs_dir.exists() or not any(settings.jobs_dir.iterdir())


def test_a_shard_waits_for_the_store_without_spending_an_attempt(
    s3: Settings, link: StoreLink, session: Session
) -> None:
    audit = planned_audit(session, add_model(session, s3), 1)
    sends = Recorded()
    cache = JobDirCache(capacity=2)
    link.cut()
    # More often than max_attempts allows tries: a spent attempt would fail the audit.
    for _ in range(s3.max_attempts + 1):
        outcome = execute_shard(
            audit.id, CPU, settings=s3, session=session, worker="w0", sends=sends, cache=cache
        )
        assert outcome == "retry"
        [shard] = _shards(session, audit.id)
        assert (shard.status, shard.attempts, shard.lease_owner) == ("queued", 0, None)
        row = _audit(session, audit.id)
        assert (row.status, row.error) == ("running", None)
    assert sends.sent == []  # type: ignore[attr-defined]  # the reconciler sends it again
    assert _no_job_dirs(s3) and cache.materialised == 0  # no half job directory is kept

    link.restore()
    outcome = execute_shard(
        audit.id, CPU, settings=s3, session=session, worker="w0", sends=sends, cache=cache
    )
    assert outcome == "done"
    [shard] = _shards(session, audit.id)
    assert (shard.status, shard.attempts, shard.worker) == ("done", 1, "w0")
    cache.clear()


def test_the_plan_waits_for_the_store_without_spending_an_attempt(
    s3: Settings, link: StoreLink, session: Session
) -> None:
    audit = add_audit(session, add_model(session, s3))
    sends = Recorded()
    link.cut()
    for _ in range(s3.max_attempts + 1):
        assert execute_audit(audit.id, settings=s3, session=session, sends=sends) == "waiting"
        row = _audit(session, audit.id)
        assert (row.status, row.attempts, row.lease_owner, row.error) == ("queued", 0, None, None)
    assert sends.sent == [] and _no_job_dirs(s3)  # type: ignore[attr-defined]

    link.restore()
    assert execute_audit(audit.id, settings=s3, session=session, sends=sends) == "planned"
    row = _audit(session, audit.id)
    assert (row.status, row.plan_attempts, row.shards_total) == ("running", 1, 1)


def _planned_and_sharded(s3: Settings, session: Session) -> tuple[Audit, Recorded]:
    """An audit planned and its one shard run, the store up: what the finalising step takes."""
    audit = add_audit(session, add_model(session, s3))
    sends = Recorded()
    assert execute_audit(audit.id, settings=s3, session=session, sends=sends) == "planned"
    cache = JobDirCache(capacity=2)
    outcome = execute_shard(
        audit.id, CPU, settings=s3, session=session, worker="w0", sends=sends, cache=cache
    )
    assert outcome == "done"
    cache.clear()
    return audit, sends


def test_the_finalising_step_waits_for_the_store_and_publishes_nothing_meanwhile(
    s3: Settings, s3_server: MotoServer, link: StoreLink, session: Session
) -> None:
    audit, sends = _planned_and_sharded(s3, session)
    link.cut()
    # The model is in this worker's blob cache and the runner merges the shards; only storing
    # the report and its files needs the store, so that is what fails, attempt after attempt.
    for _ in range(s3.max_attempts + 1):
        assert execute_audit(audit.id, settings=s3, session=session, sends=sends) == "queued"
        row = _audit(session, audit.id)
        assert (row.status, row.attempts, row.error, row.report_path) == ("queued", 0, None, None)
        assert session.scalars(select(Artifact).where(Artifact.audit_id == audit.id)).all() == []
    bucket = s3.storage_url.removeprefix("s3://").split("/")[0]
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"t/artifacts/{audit.id}/")
    assert listed.get("Contents", []) == []

    link.restore()
    assert execute_audit(audit.id, settings=s3, session=session, sends=sends) == "succeeded"
    row = _audit(session, audit.id)
    assert (row.status, row.attempts, row.report_path) == (
        "succeeded",
        1,
        f"{audit.id}/report.json",
    )
    artifacts = session.scalars(select(Artifact).where(Artifact.audit_id == audit.id)).all()
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"t/artifacts/{audit.id}/")
    assert {o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]} == {a.name for a in artifacts}
    assert {"report.json", "figure.png"} <= {a.name for a in artifacts}


def test_an_admission_waits_for_the_store_without_spending_an_attempt(
    s3: Settings, link: StoreLink, session: Session
) -> None:
    model = add_model(session, s3, status="validating")
    link.cut()
    for _ in range(s3.max_attempts + 1):
        assert execute_admission(model.id, settings=s3, session=session) == "waiting"
        row = session.get(Model, model.id, populate_existing=True)
        assert row is not None and row.status == "validating"
        assert (row.admission_info or {}).get("attempts", 0) == 0
    assert _no_job_dirs(s3)

    # Back: the model's file reaches the sandbox (whose fake runner never answers).
    link.restore()
    never = s3.model_copy(
        update={"runner_module": "tests.workers.fakes.sleep", "admission_time_limit": 2}
    )
    assert execute_admission(model.id, settings=never, session=session) == "rejected"
    row = session.get(Model, model.id, populate_existing=True)
    assert row is not None and row.reason is not None and row.reason.startswith("timed out")
    assert (row.admission_info or {}).get("attempts") == 1


def test_an_admission_whose_stored_file_is_damaged_or_gone_is_rejected_saying_so(
    s3: Settings, s3_server: MotoServer, session: Session
) -> None:
    bucket, prefix = s3.storage_url.removeprefix("s3://").split("/", 1)  # type: ignore[union-attr]
    damaged = add_model(session, s3, status="validating")
    key = f"{prefix}/blobs/{damaged.sha256[:2]}/{damaged.sha256}"
    # The same key, other bytes, and the digest the service recorded at upload
    s3_server.client().put_object(
        Bucket=bucket, Key=key, Body=b"other bytes", Metadata={"sha256": damaged.sha256}
    )
    assert execute_admission(damaged.id, settings=s3, session=session) == "rejected"
    row = session.get(Model, damaged.id, populate_existing=True)
    assert row is not None and row.reason is not None
    assert "cannot be read back intact" in row.reason and "corrupt" in row.reason
    assert _no_job_dirs(s3)

    s3_server.client().delete_object(Bucket=bucket, Key=key)
    gone = add_model(session, s3, status="validating")
    assert execute_admission(gone.id, settings=s3, session=session) == "rejected"
    row = session.get(Model, gone.id, populate_existing=True)
    assert row is not None and row.reason is not None and "missing" in row.reason


def test_a_store_that_refuses_the_worker_fails_the_audit_naming_the_setting(
    s3: Settings, session: Session
) -> None:
    audit = planned_audit(session, add_model(session, s3), 1)
    missing = s3.model_copy(update={"storage_url": "s3://no-such-bucket/t"})
    assert execute_shard(audit.id, CPU, settings=missing, session=session, worker="w0") == "failed"
    row = _audit(session, audit.id)
    assert row.status == "failed" and row.error is not None
    assert row.error["type"].endswith("/storage-unavailable") and row.error["status"] == 503
    assert "TIGHTROPE_STORAGE_URL" in row.error["detail"]


class _FullStore(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint with no room left: every request is answered 507 InsufficientStorage, as
    MinIO answers a write to a full disk."""

    def _full(self) -> None:
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InsufficientStorage</Code>'
            b"<Message>Storage backend has reached its minimum free drive threshold.</Message>"
            b"</Error>"
        )
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(507)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _full

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def full_store() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _FullStore)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_full_store_fails_the_audit_with_storage_full(
    s3: Settings, full_store: str, session: Session
) -> None:
    audit, sends = _planned_and_sharded(s3, session)
    full = s3.model_copy(update={"storage_endpoint_url": full_store})
    assert execute_audit(audit.id, settings=full, session=session, sends=sends) == "failed"
    row = _audit(session, audit.id)
    assert row.status == "failed" and row.error is not None
    assert row.error["type"].endswith("/storage-full") and row.error["status"] == 507
    assert row.report_path is None
    assert session.scalars(select(Artifact).where(Artifact.audit_id == audit.id)).all() == []
