"""What the gateway answers about an audit is honest at once: a cancel's own 202 shows that the
cancel registered, a failed audit's problem names the audit as its `instance`, and `attempts`
does not drop back while the audit moves from planning to its finalising step."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.db.tables import utcnow
from tests.service.api.test_audit_routes import (
    audit_request,
    model_id,  # noqa: F401  (a fixture)
    set_audit,
    submit,
)


def test_a_cancels_answer_shows_the_cancel_at_once(
    client: TestClient,
    auth: dict[str, str],
    model_id: str,  # noqa: F811
) -> None:
    running = submit(client, auth, audit_request(model_id)).json()["id"]
    set_audit(client, running, status="running", started_at=utcnow(), lease_owner="w")
    before = client.get(f"/v1/audits/{running}", headers=auth).json()
    assert before["cancel_requested"] is False

    answer = client.post(f"/v1/audits/{running}/cancel", headers=auth)
    assert answer.status_code == 202
    body = answer.json()
    # Still running (its worker stops at the next checkpoint), but visibly being cancelled.
    assert (body["status"], body["cancel_requested"]) == ("running", True)
    polled = client.get(f"/v1/audits/{running}", headers=auth)
    assert polled.json()["cancel_requested"] is True
    listed = client.get("/v1/audits", headers=auth).json()["items"]
    assert {item["id"]: item["cancel_requested"] for item in listed}[running] is True

    queued = submit(client, auth, audit_request(model_id, seed=1)).json()["id"]
    body = client.post(f"/v1/audits/{queued}/cancel", headers=auth).json()
    assert (body["status"], body["cancel_requested"]) == ("cancelled", True)


def test_a_poll_etag_changes_when_a_cancel_is_asked(
    client: TestClient,
    auth: dict[str, str],
    model_id: str,  # noqa: F811
) -> None:
    audit_id = submit(client, auth, audit_request(model_id)).json()["id"]
    set_audit(client, audit_id, status="running", started_at=utcnow(), lease_owner="w")
    etag = client.get(f"/v1/audits/{audit_id}", headers=auth).headers["etag"]
    set_audit(client, audit_id, cancel_requested=True)  # nothing else changes
    response = client.get(f"/v1/audits/{audit_id}", headers={**auth, "If-None-Match": etag})
    assert response.status_code == 200 and response.json()["cancel_requested"] is True


def test_a_failed_audits_problem_names_the_audit_as_its_instance(
    client: TestClient,
    auth: dict[str, str],
    model_id: str,  # noqa: F811
) -> None:
    audit_id = submit(client, auth, audit_request(model_id)).json()["id"]
    error = {
        "type": "https://tightrope.dev/problems/time-limit",
        "title": "Time limit exceeded",
        "status": 422,
        "detail": "shard lipschitz-0 timed out after 79.8 s, what was left of the audit's time "
        "limit; the audit's time limit is 120 s, set by the audit's budget.wall_seconds",
        "extra": {"limit_seconds": 120.0, "limit_source": "budget", "shard": "lipschitz-0"},
    }
    set_audit(client, audit_id, status="failed", error=error, finished_at=utcnow())
    problem = client.get(f"/v1/audits/{audit_id}", headers=auth).json()["error"]
    assert problem["instance"] == f"/v1/audits/{audit_id}"
    assert problem["extra"] == error["extra"] and problem["detail"] == error["detail"]
    listed = client.get("/v1/audits", headers=auth).json()["items"]
    assert listed[0]["error"]["instance"] == f"/v1/audits/{audit_id}"


def test_attempts_keep_the_planning_tries_through_the_finalising_step(
    client: TestClient,
    auth: dict[str, str],
    model_id: str,  # noqa: F811
) -> None:
    """A worker stores the plan (planning took 2 tries) and resets its count for the
    finalising step: the answer keeps showing 2, not 0, then 2 for the first finalising try."""
    audit_id = submit(client, auth, audit_request(model_id)).json()["id"]
    set_audit(client, audit_id, status="running", attempts=2)
    assert client.get(f"/v1/audits/{audit_id}", headers=auth).json()["attempts"] == 2
    set_audit(client, audit_id, attempts=0, plan_attempts=2, shards_total=1)
    assert client.get(f"/v1/audits/{audit_id}", headers=auth).json()["attempts"] == 2
    set_audit(client, audit_id, attempts=1)
    assert client.get(f"/v1/audits/{audit_id}", headers=auth).json()["attempts"] == 2
    set_audit(client, audit_id, attempts=3)  # the finalising step needed 3
    assert client.get(f"/v1/audits/{audit_id}", headers=auth).json()["attempts"] == 3
