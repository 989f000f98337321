"""Faults the service must survive without losing an audit."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from tests.integration.conftest import (
    audit_request,
    canonical,
    client_for,
    shard_rows,
    upload_ready_model,
    wait_until,
)

pytestmark = pytest.mark.integration

# Several shards (one per image), each long enough that a kill lands in the middle of one.
SLOW_CHECKS = [
    {
        "kind": "worst_case",
        "levels": [0.01, 0.05],
        # about 2 s a shard: long enough to kill a worker in the middle of one (a kept runner
        # child makes each shard start at once, so short ones end between two polls)
        "steps": 300,
        "restarts": 4,
        "early_stop_tolerance": 0.0,
    },
]


def _slow_request(model_id: str) -> dict:
    return audit_request(
        model_id,
        dataset={"builtin": "ellipses", "count": 4, "size": 16, "seed": 3},
        checks=SLOW_CHECKS,
        budget={"images_per_shard": 1},
    )


def _process_tree(pid: int) -> set[int]:
    """`pid` and all its descendants (Linux /proc)."""
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        tree.add(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(child) for child in (task / "children").read_text().split())
    return tree


def _lease_pid(owner: str | None) -> int | None:
    """The process of a lease owner (workers.execution.leases.new_owner: host:pid:random)."""
    parts = (owner or "").split(":")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


# PostgreSQL only: several workers sharing audits is the PostgreSQL deployment. The leases and
# shard claims this relies on are tested on both databases in tests/workers/execution
# (test_leases, test_shard_job, test_worker_processes); a stack per database doubled the time.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.timeout(600)  # two audits of 6 sandboxed children each, plus the recovery
def test_worker_killed_mid_audit_is_finished_by_another(
    database_url: str, make_stack, model_file: Path
) -> None:
    """Two workers share an audit; one is SIGKILLed while it runs a shard. The other one, and
    no new one, finishes the audit: the dead worker's shard lease expires, the reconciler
    queues the shard again, and the report is the undisturbed run's."""
    stack = make_stack(database_url, workers=2)
    with client_for(stack) as client:
        model_id = upload_ready_model(client, model_file)

        # the undisturbed run, for reference
        reference = client.wait_audit(
            client.submit_audit(_slow_request(model_id))["id"], timeout=300
        )
        assert reference["status"] == "succeeded", reference.get("error")
        expected = client.get_report(reference["id"])

        audit_id = client.submit_audit(_slow_request(model_id))["id"]
        victim = stack.processes["worker0"].pid

        def shard_of_worker0() -> dict | None:
            """A shard worker0 has been running for a moment (its child is mid-shard)."""
            status = client.get_audit(audit_id)
            assert status["status"] in ("queued", "running"), status
            for row in shard_rows(stack, audit_id):
                if row["status"] == "running" and _lease_pid(row["lease_owner"]) in _process_tree(
                    victim
                ):
                    time.sleep(1.0)
                    again = {r["shard_id"]: r for r in shard_rows(stack, audit_id)}
                    same = again[row["shard_id"]]
                    if same["status"] == "running" and same["lease_owner"] == row["lease_owner"]:
                        return same
            return None

        killed = wait_until(shard_of_worker0, 180, "worker0 running a shard of the audit")
        stack.kill("worker0")  # the supervisor, its Celery children and the runner: no goodbye
        assert client.get_audit(audit_id)["shards"]["done"] < 4

        final = client.wait_audit(audit_id, timeout=300)
        assert final["status"] == "succeeded", final.get("error")
        assert final["shards"]["done"] == final["shards"]["total"] == 4
        assert set(stack.processes) == {"api", "worker1"}  # nobody was started meanwhile
        rows = {row["shard_id"]: row for row in shard_rows(stack, audit_id)}
        assert {row["status"] for row in rows.values()} == {"done"}
        # the shard worker0 died in was leased again and run by the survivor
        assert rows[killed["shard_id"]]["attempts"] >= 2, rows[killed["shard_id"]]
        report = client.get_report(audit_id)
        assert canonical(report["checks"]) == canonical(expected["checks"])
        assert report["verdict"] == expected["verdict"]


def test_redis_flushed_while_queued(make_stack, redis_client, model_file: Path, tmp_path) -> None:
    """A broker that restarts without persistence loses the message; the audit still completes."""
    stack = make_stack(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with client_for(stack) as client:
        model_id = upload_ready_model(client, model_file)
        stack.kill("worker0")
        audit_id = client.submit_audit(audit_request(model_id))["id"]
        assert redis_client.dbsize() > 0  # the message is waiting in the broker
        redis_client.flushdb()
        stack.start_worker("worker1")
        final = client.wait_audit(audit_id, timeout=240)
        assert final["status"] == "succeeded", final.get("error")
