"""An audit spread over several workers, and the faults a spread audit must survive: a flushed
broker between shards, a PostgreSQL restart, a full data directory; and the fair share between
tenants. All real: the HTTP gateway, supervised worker processes, Redis, the databases and the
sandboxed runner.

Every shard runs in a fresh sandboxed child (a few seconds of imports each), so the audits here
are as small as the point of each test allows: 16×16 images, one image per shard, cheap checks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from sqlalchemy import create_engine, func, select

from service.db.tables import Artifact
from tests.integration.conftest import (
    audit_request,
    client_for,
    shard_rows,
    upload_ready_model,
    wait_until,
)
from workers.cli.client import TightropeClient
from workers.cli.stack import LocalStack, free_port

pytestmark = pytest.mark.integration

CHEAP_CHECK = {"kind": "random_noise", "levels": [0.01], "samples": 2}
# About 2 s a shard on 2 cores: a kept runner child makes cheap shards so quick that a test
# could not see an audit part-done (some shards stored, others waiting) before it ends.
SLOW_CHECK = {
    "kind": "worst_case",
    "levels": [0.01, 0.05],
    "steps": 300,
    "restarts": 4,
    "early_stop_tolerance": 0.0,
}


def sharded_request(model_id: str, images: int, seed: int = 1, check: dict | None = None) -> dict:
    """One shard per image (one check, cheap unless given)."""
    return audit_request(
        model_id,
        dataset={"builtin": "ellipses", "count": images, "size": 16, "seed": seed},
        checks=[check or CHEAP_CHECK],
        budget={"images_per_shard": 1},
    )


def raw_report(client: TightropeClient, audit_id: str) -> bytes:
    response = client._http.get(f"/v1/audits/{audit_id}/report")
    assert response.status_code == 200, response.text
    return response.content


def without_run_identity(raw: bytes) -> str:
    """The report minus what names or measures one run rather than its result: `audit_id` (each
    run is its own audit), `cost.wall_seconds` (time measured on a loaded machine) and the
    `signature` (over the whole report, so over those two as well). Everything else must not
    depend on how many workers ran the shards, or which. Re-serialised in the served key order
    (no sort_keys; floats round-trip exactly), so equal strings mean equal served bytes but for
    those three fields."""
    report = json.loads(raw)
    del report["audit_id"]
    del report["cost"]["wall_seconds"]
    del report["signature"]
    return json.dumps(report, ensure_ascii=False, separators=(",", ":"))


def part_done(client: TightropeClient, audit_id: str, timeout: float = 180) -> dict:
    """Wait until the audit has stored some of its shards but not all of them."""

    def check() -> dict | None:
        status = client.get_audit(audit_id)
        assert status["status"] in ("queued", "running"), status
        done, total = status["shards"]["done"], status["shards"]["total"]
        return status if 0 < done < total else None

    return wait_until(check, timeout, f"audit {audit_id} part-done")


# PostgreSQL only: several workers sharing audits is the PostgreSQL deployment. The leases and
# shard claims this relies on are tested on both databases in tests/workers/execution
# (test_leases, test_shard_job, test_worker_processes); a stack per database doubled the time.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.timeout(600)  # two audits of 8 sandboxed children each, on a loaded 2-core host
def test_two_workers_share_one_audit_and_match_the_one_worker_report(
    database_url: str, make_stack, model_file: Path
) -> None:
    # (database_url first: its database is dropped after the stack using it has stopped)
    stack: LocalStack = make_stack(database_url, workers=0)
    stack.start_worker("worker0")  # `tightrope worker --name worker0`: worker0-cpu1@<host>
    stack.start_worker("worker1")
    stack.wait_for("/readyz", 180)
    with client_for(stack) as client:
        model_id = upload_ready_model(client, model_file)
        request = sharded_request(model_id, images=6)

        shared = client.wait_audit(client.submit_audit(request)["id"], timeout=300)
        assert shared["status"] == "succeeded", shared.get("error")
        assert shared["shards"]["done"] == shared["shards"]["total"] >= 6
        rows = shard_rows(stack, shared["id"])
        assert len(rows) == shared["shards"]["total"]
        assert {row["status"] for row in rows} == {"done"}
        workers = {row["worker"] for row in rows}
        assert len(workers) >= 2, workers  # both workers ran shards of the one audit
        assert {w.split("@")[0] for w in workers} == {"worker0-cpu1", "worker1-cpu1"}, workers

        stack.kill("worker1")
        alone = client.wait_audit(client.submit_audit(request)["id"], timeout=300)
        assert alone["status"] == "succeeded", alone.get("error")
        assert alone["shards"]["done"] == alone["shards"]["total"] == shared["shards"]["total"]
        alone_workers = {row["worker"].split("@")[0] for row in shard_rows(stack, alone["id"])}
        assert alone_workers == {"worker0-cpu1"}

        assert without_run_identity(raw_report(client, shared["id"])) == without_run_identity(
            raw_report(client, alone["id"])
        )


def test_redis_flushed_between_shards(
    make_stack, redis_client: redis.Redis, model_file: Path, tmp_path: Path
) -> None:
    """A broker that loses everything mid-audit (restarted without persistence, flushed): the
    shard tokens waiting in it, the finalising message to come. The rows say what is left; the
    reconciler sends it again."""
    stack = make_stack(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with client_for(stack) as client:
        model_id = upload_ready_model(client, model_file)
        audit_id = client.submit_audit(sharded_request(model_id, 4, check=SLOW_CHECK))["id"]
        part_done(client, audit_id)
        assert redis_client.dbsize() > 0  # shard tokens wait in the broker
        redis_client.flushdb()
        final = client.wait_audit(audit_id, timeout=240)
        assert final["status"] == "succeeded", final.get("error")
        assert final["shards"]["done"] == final["shards"]["total"] == 4
        assert client.get_report(audit_id)["checks"][0]["images"] == 4


PG_BIN = Path("/usr/local/bin")


def _as_postgres(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=120
    )


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[tuple[str, Path]]:
    """A PostgreSQL cluster of this test's own (initdb, trust auth, a free port, its socket in
    its own directory), so that it can be restarted; stopped and removed afterwards. Yields the
    database URL and the data directory. The directory is outside pytest's tmp_path, which
    the `postgres` user cannot enter."""
    if os.geteuid() != 0 or not (PG_BIN / "initdb").exists() or not shutil.which("runuser"):
        pytest.skip("needs root, runuser and initdb/pg_ctl to own a PostgreSQL cluster")
    root = Path(tempfile.mkdtemp(prefix="tightrope-pg-"))
    shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    port = free_port()
    started = False
    try:
        init = _as_postgres(
            str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"
        )
        assert init.returncode == 0, init.stdout + init.stderr
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = _as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options,
            "-w", "start",
        )  # fmt: skip
        started = True
        assert start.returncode == 0, start.stdout + start.stderr
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE tightrope")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/tightrope", data
    finally:
        if started:
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_postgresql_restart_mid_audit(make_stack, model_file: Path) -> None:
    with throwaway_cluster() as (database_url, pg_data):
        stack = make_stack(database_url)
        with client_for(stack) as client:
            model_id = upload_ready_model(client, model_file)
            audit_id = client.submit_audit(sharded_request(model_id, 4, check=SLOW_CHECK))["id"]
            part_done(client, audit_id)

            # Poll through the restart: what does a client see meanwhile, and afterwards?
            during: list[str] = []
            after: list[str] = []
            restarted = False
            final: dict | None = None

            def poll() -> dict | None:
                try:
                    response = client._http.get(f"/v1/audits/{audit_id}")
                except httpx.HTTPError as exc:
                    (after if restarted else during).append(type(exc).__name__)
                    return None
                if response.status_code >= 500:
                    problem = response.json() if response.content else {}
                    answer = f"{response.status_code} {problem.get('type', '')}"
                    (after if restarted else during).append(answer)
                    return None
                assert response.status_code == 200, response.text
                return response.json()

            restart = subprocess.Popen(
                [
                    "runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(pg_data),
                    "-m", "fast", "-w", "restart",
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            while restart.poll() is None:
                poll()
                time.sleep(0.05)
            assert restart.returncode == 0
            restarted = True

            deadline = time.monotonic() + 240
            while final is None or final["status"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, f"the audit never finished: {final}"
                final = poll() or final
                time.sleep(0.3)
            print(f"during the restart the gateway answered: {during}")
            assert final["status"] == "succeeded", final.get("error")
            assert final["shards"]["done"] == final["shards"]["total"] == 4
            rows = shard_rows(stack, audit_id)
            assert [row["status"] for row in rows] == ["done"] * 4
            assert client.get_report(audit_id)["checks"][0]["images"] == 4
            # Once the database is back, every request is answered: pre-ping replaces the
            # pooled connections the restart closed.
            internal = [answer for answer in after if answer.startswith("500")]
            assert not internal, f"after the restart: {after}"


def _fill(directory: Path) -> Path:
    """Write one file into `directory` until its filesystem has no byte left (ENOSPC)."""
    filler = directory / "filler"
    chunk = b"\0" * (1024 * 1024)
    with open(filler, "wb", buffering=0) as f:
        for size in (len(chunk), 4096, 1):
            try:
                while True:
                    f.write(chunk[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    assert os.statvfs(directory).f_bavail == 0
    return filler


def test_a_full_data_directory_fails_the_audit_cleanly(
    make_stack, model_file: Path, tmp_path: Path
) -> None:
    """The data directory (blobs, job directories, artifacts) fills up mid-audit: the audit
    fails with `storage-full` (507 in the problem), not stuck and not an internal error, and
    nothing of it is published. The database (SQLite here) and the logs live elsewhere, as
    they would on their own volumes: the point is the data directory."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    data_dir = tmp_path / "data0"  # the first stack's data directory (make_stack)
    data_dir.mkdir()
    # A stack needs well under 1 MB here (the model blob, a job directory per worker,
    # the signing keys); 32 MB leaves room and fills in a blink.
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(data_dir)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    stack: LocalStack | None = None
    try:
        # The harness logs into <data_dir>/logs: kept off the full disk, so a process that
        # logs is not the one that fails first.
        (tmp_path / "logs").mkdir()
        (data_dir / "logs").symlink_to(tmp_path / "logs")
        stack = make_stack(f"sqlite:///{tmp_path / 'db.sqlite'}")
        assert stack.data_dir == data_dir
        with client_for(stack) as client:
            model_id = upload_ready_model(client, model_file)
            audit_id = client.submit_audit(sharded_request(model_id, 4, check=SLOW_CHECK))["id"]
            before = part_done(client, audit_id)["shards"]["done"]
            filler = _fill(data_dir)

            final = client.wait_audit(audit_id, timeout=120)
            assert final["status"] == "failed", final
            assert final["error"]["type"].endswith("/storage-full"), final["error"]
            assert final["error"]["status"] == 507
            # Whichever write met the full disk first (a shard's job file or result, or the
            # finalising job directory), the shards stored before it stay stored.
            assert final["shards"]["done"] >= before
            for name in ("report", "report.html", "report.junit.xml"):
                response = client._http.get(f"/v1/audits/{audit_id}/{name}")
                assert response.status_code == 409, (name, response.status_code, response.text)
                assert response.json()["type"].endswith("/report-not-ready")
            for name in ("report.json", "report.html"):
                response = client._http.get(f"/v1/audits/{audit_id}/artifacts/{name}")
                assert response.status_code == 404, (name, response.status_code)
            assert not (data_dir / "artifacts" / audit_id).exists()
            engine = create_engine(stack.database_url)
            try:
                with engine.connect() as conn:
                    listed = conn.scalar(
                        select(func.count())
                        .select_from(Artifact)
                        .where(Artifact.audit_id == audit_id)
                    )
            finally:
                engine.dispose()
            assert listed == 0
            assert {row["status"] for row in shard_rows(stack, audit_id)} <= {"done", "cancelled"}

            filler.unlink()  # an operator makes room: the service answers as before
            stack.wait_for("/readyz", 30)
            assert client.get_audit(audit_id)["status"] == "failed"
    finally:
        if stack is not None:
            stack.stop()  # nothing of the stack may hold the mount
        unmounted = subprocess.run(["umount", str(data_dir)], capture_output=True)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(data_dir)], check=False)


@pytest.mark.timeout(600)  # 14 sandboxed children on a loaded 2-core host
def test_a_small_audit_of_another_tenant_starts_while_a_big_one_runs(
    make_stack, model_file: Path, tmp_path: Path
) -> None:
    """One worker; tenant A's audit of 12 shards is running when tenant B submits 2 shards.
    The fair share (workers.execution.shard_leases) runs B's shards before A's remaining ones,
    so B is
    done while A still has shards waiting."""
    stack = make_stack(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with client_for(stack, tenant="big") as big, client_for(stack, tenant="small") as small:
        big_model = upload_ready_model(big, model_file)
        small_model = upload_ready_model(small, model_file)
        big_id = big.submit_audit(sharded_request(big_model, 12, check=SLOW_CHECK))["id"]

        def big_running() -> bool:
            status = big.get_audit(big_id)
            assert status["status"] in ("queued", "running"), status
            return status["shards"]["total"] > 0

        wait_until(big_running, 120, "the big audit planned")
        small_id = small.submit_audit(sharded_request(small_model, images=2, seed=2))["id"]

        def small_finished() -> dict | None:
            status = small.get_audit(small_id)
            if status["status"] in ("succeeded", "failed", "cancelled"):
                return status
            # Fail early rather than wait for the small audit behind all of the big one.
            big_shards = big.get_audit(big_id)["shards"]
            assert big_shards["done"] < big_shards["total"], (
                f"all of the big audit's shards ran before the small audit finished: {status}"
            )
            return None

        small_final = wait_until(small_finished, 300, "the small audit finished")
        big_then = big.get_audit(big_id)

        assert small_final["status"] == "succeeded", small_final.get("error")
        assert small_final["shards"]["done"] == small_final["shards"]["total"] == 2
        assert big_then["status"] == "running", big_then
        assert big_then["shards"]["total"] == 12
        assert big_then["shards"]["done"] < 12, big_then["shards"]
