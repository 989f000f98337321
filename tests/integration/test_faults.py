"""Faults the service must survive without losing an audit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.conftest import (
    audit_request,
    canonical,
    client_for,
    upload_ready_model,
)

pytestmark = pytest.mark.integration

# Several shards, each long enough that a kill lands in the middle of the audit.
SLOW_CHECKS = [
    {
        "kind": "worst_case",
        "levels": [0.01, 0.05],
        "steps": 25,
        "restarts": 2,
        "early_stop_tolerance": 0.0,
    },
    {"kind": "random_noise", "levels": [0.02], "samples": 8},
]


def _slow_request(model_id: str) -> dict:
    return audit_request(
        model_id,
        dataset={"builtin": "ellipses", "count": 4, "size": 16, "seed": 3},
        checks=SLOW_CHECKS,
        budget={"images_per_shard": 1},
    )


def test_worker_killed_mid_audit_is_finished_by_another(
    make_stack, database_url: str, model_file: Path
) -> None:
    stack = make_stack(database_url)
    with client_for(stack) as client:
        model_id = upload_ready_model(client, model_file)

        # the undisturbed run, for reference
        reference = client.wait_audit(
            client.submit_audit(_slow_request(model_id))["id"], timeout=300
        )
        assert reference["status"] == "succeeded", reference
        expected = client.get_report(reference["id"])

        audit_id = client.submit_audit(_slow_request(model_id))["id"]
        deadline = time.monotonic() + 120
        while True:
            status = client.get_audit(audit_id)
            if status["status"] == "running" and status["progress"]["fraction"] > 0.1:
                break
            assert status["status"] in ("queued", "running"), status
            assert time.monotonic() < deadline, "the audit never got going"
            time.sleep(0.2)
        assert status["progress"]["fraction"] < 1.0
        stack.kill("worker0")  # the supervisor, its Celery child and the runner: no goodbye
        stack.start_worker("worker1")

        final = client.wait_audit(audit_id, timeout=300)
        assert final["status"] == "succeeded", final
        assert final["attempts"] >= 2
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
        assert final["status"] == "succeeded", final
