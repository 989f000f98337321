"""Liveness, readiness (database, broker, a live worker) and Prometheus metrics."""

from __future__ import annotations

import os
from datetime import timedelta

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.db.models import Audit, WorkerHeartbeat, utcnow
from service.settings import Settings
from tests.service.conftest import UNREACHABLE_BROKER, assert_problem, new_key, sessions_of


def beat(client: TestClient, age_seconds: float) -> None:
    with sessions_of(client)() as session:
        session.merge(
            WorkerHeartbeat(
                name=f"worker-{os.getpid()}",
                hostname="test",
                pid=os.getpid(),
                last_seen=utcnow() - timedelta(seconds=age_seconds),
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
    assert client.get("/readyz").json() == {"status": "ready"}
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
