"""Liveness, readiness (database, broker, a live worker) and Prometheus metrics."""

from __future__ import annotations

import os
from datetime import timedelta

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.db.tables import Audit, WorkerHeartbeat, utcnow
from service.settings import Settings
from tests.service.conftest import UNREACHABLE_BROKER, assert_problem, new_key, sessions_of


def beat(
    client: TestClient,
    age_seconds: float,
    name: str | None = None,
    sandbox: str | None = None,
    problem: str | None = None,
) -> None:
    with sessions_of(client)() as session:
        session.merge(
            WorkerHeartbeat(
                name=name or f"worker-{os.getpid()}",
                hostname="test",
                pid=os.getpid(),
                last_seen=utcnow() - timedelta(seconds=age_seconds),
                sandbox=sandbox,
                sandbox_problem=problem,
            )
        )
        session.commit()


def clear_beats(client: TestClient) -> None:
    with sessions_of(client)() as session:
        session.query(WorkerHeartbeat).delete()
        session.commit()


def test_readiness_follows_worker_heartbeats(client: TestClient) -> None:
    clear_beats(client)
    body = assert_problem(client.get("/readyz"), 503, "not-ready")
    assert "worker" in body["detail"] and body["extra"]["down"] == ["worker"]
    beat(client, age_seconds=120)
    assert "no heartbeat" in assert_problem(client.get("/readyz"), 503)["detail"]
    beat(client, age_seconds=1)
    assert client.get("/readyz").json() == {
        "status": "ready",
        "sandbox": "available on 1 of 1 live workers",
        "warnings": [],
    }
    clear_beats(client)


MISSING = "bubblewrap (bwrap) is not installed: install it"


def test_readiness_reports_live_workers_that_cannot_sandbox(client: TestClient) -> None:
    """Each heartbeat says whether its worker's probe of bubblewrap worked: some workers
    without it are a warning; none with it is not ready, naming `sandbox`; a stale worker
    that could sandbox does not count."""
    clear_beats(client)
    beat(client, 1, "a@test", "unavailable", MISSING)
    beat(client, 1, "b@test", "bwrap")
    body = client.get("/readyz").json()
    assert body["status"] == "ready" and body["sandbox"] == "unavailable on 1 of 2 live workers"
    assert body["warnings"] == [
        f"sandbox: unavailable on 1 of 2 live workers ({MISSING}); TorchScript .pt, "
        "torch.export .pt2 and ONNX .onnx uploads they get wait for another"
    ]

    beat(client, 120, "b@test", "bwrap")  # the only worker that could is gone
    body = assert_problem(client.get("/readyz"), 503, "not-ready")
    assert body["extra"]["down"] == ["sandbox"]
    assert body["detail"].startswith(
        f"sandbox: no live worker can sandbox models (unavailable on 1 of 1: {MISSING}"
    )
    assert "uploads cannot be admitted and are refused 600 s after their upload" in body["detail"]

    beat(client, 1, "c@test", "off")
    body = client.get("/readyz").json()
    assert body["sandbox"] == "unavailable on 1 of 2 live workers; off on 1 of 2 live workers"
    assert body["warnings"][0].startswith("sandbox: off on 1 of 2 live workers")
    clear_beats(client)


def test_readiness_without_sandbox_may_be_degraded_instead(settings: Settings) -> None:
    """TIGHTROPE_READY_WITHOUT_SANDBOX (`tightrope demo`): 200 `degraded` with the reason."""
    lenient = settings.model_copy(update={"ready_without_sandbox": True})
    with TestClient(create_app(lenient), raise_server_exceptions=False) as client:
        clear_beats(client)
        beat(client, 0, "a@test", "unavailable", MISSING)
        answer = client.get("/readyz")
        assert answer.status_code == 200
        body = answer.json()
        assert (body["status"], body["sandbox"]) == (
            "degraded",
            "unavailable on 1 of 1 live workers",
        )
        assert body["warnings"][0].startswith("sandbox: no live worker can sandbox models")
        clear_beats(client)


def test_readiness_names_a_broker_that_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"broker_url": UNREACHABLE_BROKER})
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        beat(client, age_seconds=0)
        body = assert_problem(client.get("/readyz"), 503, "not-ready")
        assert body["extra"]["down"] == ["broker"]
        clear_beats(client)


def test_metrics_count_requests_and_audits(client: TestClient) -> None:
    auth = new_key(client)
    client.get("/v1/models/mdl_nope", headers=auth)
    text = client.get("/metrics").text
    assert (
        'tightrope_http_requests_total{method="GET",route="/v1/models/{model_id}",status="404"}'
        in text
    )
    assert "tightrope_http_request_seconds_bucket" in text
    with sessions_of(client)() as session:
        queued = session.query(Audit).filter(Audit.status == "queued").count()
    assert f'tightrope_audits{{status="queued"}} {float(queued)}' in text
