"""`/v1/audits`: submission (row committed before the message), polling, listing, cancel,
reports and artifacts."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from service.api.app import create_app
from service.db.tables import Artifact, Audit, AuditShard, utcnow
from service.queue.broker import ALL_QUEUES, QUEUE_CPU, QUEUE_GPU, broker_keys
from service.settings import Settings
from tests.service.api.test_poll_load import count_queries
from tests.service.conftest import (
    UNREACHABLE_BROKER,
    ModelFiles,
    assert_problem,
    broker_count,
    broker_messages,
    make_settings,
    new_key,
    ready_model,
    sessions_of,
    set_model_status,
    upload_model,
)


def audit_request(model_id: str, **overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model_id": model_id,
        "dataset": {"builtin": "shepp_logan", "count": 1, "size": 16},
        "operator": {"kind": "mri", "acceleration": 4},
        "checks": [{"kind": "lipschitz", "iterations": 3}],
    }
    request.update(overrides)
    return request


@pytest.fixture
def model_id(client: TestClient, auth: dict[str, str], model_files: ModelFiles) -> str:
    return ready_model(client, auth, model_files.torchscript)


def submit(client: TestClient, auth: dict[str, str], body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/audits", headers={**auth, **headers}, json=body)


def set_audit(client: TestClient, audit_id: str, **values: Any) -> None:
    with sessions_of(client)() as session:
        audit = session.get(Audit, audit_id)
        assert audit is not None
        for name, value in values.items():
            setattr(audit, name, value)
        session.commit()


def count_audits(client: TestClient) -> int:
    with sessions_of(client)() as session:
        return int(session.scalar(select(func.count()).select_from(Audit)) or 0)


def sent_for(broker: redis.Redis, audit_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(Redis list, message) of every waiting message about this audit, in any queue."""
    return [
        (key, message)
        for queue in ALL_QUEUES
        for key, message in broker_messages(broker, queue)
        if message["headers"]["argsrepr"] == repr([audit_id])
    ]


def add_shards(client: TestClient, audit_id: str, *shards: tuple[int, str, str]) -> None:
    """Planned shards of an audit, as a worker would write them: (check_index, kind, status)."""
    with sessions_of(client)() as session:
        for position, (check_index, kind, status) in enumerate(shards):
            session.add(
                AuditShard(
                    audit_id=audit_id,
                    shard_id=f"{check_index}-{kind}-{position}",
                    status=status,
                    position=position,
                    check_index=check_index,
                    kind=kind,
                    finished_at=utcnow() if status == "done" else None,
                )
            )
        session.commit()


def shard_statuses(client: TestClient, audit_id: str) -> dict[str, str]:
    with sessions_of(client)() as session:
        rows = session.execute(
            select(AuditShard.shard_id, AuditShard.status).where(AuditShard.audit_id == audit_id)
        )
        return {shard_id: status for shard_id, status in rows}


def test_submit_commits_then_enqueues(
    client: TestClient, auth: dict[str, str], model_id: str, broker: redis.Redis
) -> None:
    before = broker_count(broker)
    response = submit(client, auth, audit_request(model_id))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["model_id"] == model_id
    assert response.headers["location"] == f"/v1/audits/{body['id']}"
    assert response.headers["retry-after"] == "2"
    assert body["links"]["cancel"] == f"/v1/audits/{body['id']}/cancel"
    assert body["priority"] == "normal" and body["shards"] == {"done": 0, "total": 0}
    assert body["checks"] is None
    with sessions_of(client)() as session:
        row = session.get(Audit, body["id"])
        assert row is not None and row.enqueued_at is not None
        assert row.queue == QUEUE_CPU and row.priority == "normal"
        # The stored request is canonical: defaults are filled in, aliases used; the priority
        # has its own column (the workers read the request as the audit's config).
        assert row.request["seed"] == 0 and row.request["checks"][0]["tolerance"] == 1e-4
        assert "priority" not in row.request
        assert len(row.request_hash) == 64
    assert broker_count(broker) == before + 1
    ((key, message),) = sent_for(broker, body["id"])
    assert key == broker_keys(QUEUE_CPU)[4]  # device `auto`, priority `normal`
    assert message["headers"]["task"] == "tightrope.run_audit"


def test_broker_down_still_accepts_and_keeps_the_row(
    tmp_path: Path, settings: Settings, model_files: ModelFiles
) -> None:
    down = settings.model_copy(update={"broker_url": UNREACHABLE_BROKER})
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        auth = new_key(client)
        upload = upload_model(client, auth, model_files.torchscript)
        assert upload.status_code == 202  # the model row stays `validating` for the reconciler
        set_model_status(client, upload.json()["id"], "ready")
        response = submit(client, auth, audit_request(upload.json()["id"]))
        assert response.status_code == 202, response.text
        with sessions_of(client)() as session:
            row = session.get(Audit, response.json()["id"])
            assert row is not None and row.status == "queued"


def test_model_must_be_known_and_ready(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    body = assert_problem(submit(client, auth, audit_request("mdl_unknown")), 422)
    assert body["errors"][0]["loc"] == ["body", "model_id"]
    pending = upload_model(client, auth, model_files.torchscript).json()["id"]
    body = assert_problem(submit(client, auth, audit_request(pending)), 409, "model-not-ready")
    assert "validated" in body["detail"]
    set_model_status(client, pending, "rejected", "uses torch.from_file")
    body = assert_problem(submit(client, auth, audit_request(pending)), 409, "model-not-ready")
    assert "torch.from_file" in body["detail"]
    other = new_key(client)
    set_model_status(client, pending, "ready")
    assert_problem(submit(client, other, audit_request(pending)), 422)  # another tenant's
    assert client.get("/v1/audits", headers=auth).json()["items"] == []
    assert client.get("/v1/audits", headers=other).json()["items"] == []


def test_invalid_request_names_the_field(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    body = assert_problem(submit(client, auth, audit_request(model_id, checks=[])), 422)
    assert body["errors"][0]["loc"] == ["body", "checks"]
    body = assert_problem(
        submit(client, auth, audit_request(model_id, operator={"kind": "mri", "bogus": 1})), 422
    )
    assert any("bogus" in e["loc"] for e in body["errors"])
    response = client.post(
        "/v1/audits", headers={**auth, "content-type": "application/json"}, content=b"{not json"
    )
    assert_problem(response, 422)


def test_seeds_are_bounded_to_63_bits(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    """Seeds reach torch and numpy: above 2**63 - 1 is a 422 naming the field, the bound is
    accepted, and the OpenAPI schema states it."""
    huge = 123456789012345678901234567890  # 30 digits
    largest = 2**63 - 1
    placements: dict[str, Any] = {
        "checks": lambda seed: {"checks": [{"kind": "lipschitz", "iterations": 3, "seed": seed}]},
        "dataset": lambda seed: {
            "dataset": {"builtin": "shepp_logan", "count": 1, "size": 16, "seed": seed}
        },
        "operator": lambda seed: {"operator": {"kind": "mri", "acceleration": 4, "seed": seed}},
    }
    for where, place in placements.items():
        for bad in (huge, largest + 1):
            body = assert_problem(submit(client, auth, audit_request(model_id, **place(bad))), 422)
            locs = [e["loc"] for e in body["errors"]]
            assert any(loc[1] == where and loc[-1] == "seed" for loc in locs), (where, locs)
            assert "seed" in body["detail"]
        accepted = submit(client, auth, audit_request(model_id, **place(largest)))
        assert accepted.status_code == 202, (where, accepted.text)
    body = assert_problem(submit(client, auth, audit_request(model_id, seed=huge)), 422)
    assert body["errors"][0]["loc"] == ["body", "seed"]
    # FastAPI's OpenAPI model holds `maximum` as a float: the bound shows as 2.0**63
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    check_seed = schemas["LipschitzCheck"]["properties"]["seed"]["anyOf"][0]
    assert check_seed["minimum"] == 0 and check_seed["maximum"] == float(largest)
    assert schemas["BuiltinDataset"]["properties"]["seed"]["maximum"] == float(largest)
    assert schemas["MRIOperator"]["properties"]["seed"]["maximum"] == float(largest)


def test_file_references_are_refused(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    body = assert_problem(
        submit(client, auth, audit_request(model_id, dataset={"file": "/etc/passwd"})), 422
    )
    assert "only accepted by the local CLI" in body["detail"]
    operator = {"kind": "inpainting", "mask": {"file": "mask.npy"}}
    body = assert_problem(submit(client, auth, audit_request(model_id, operator=operator)), 422)
    assert body["errors"][0]["loc"] == ["body", "operator", "mask", "file"]


def test_dataset_references_must_exist_for_the_tenant(
    client: TestClient,
    auth: dict[str, str],
    model_id: str,
    model_files: ModelFiles,
    tmp_path: Path,
) -> None:
    body = assert_problem(
        submit(client, auth, audit_request(model_id, dataset={"dataset_id": "ds_nope"})), 422
    )
    assert body["errors"][0]["loc"] == ["body", "dataset", "dataset_id"]
    path = tmp_path / "images.npz"
    np.savez(path, images=np.zeros((2, 1, 16, 16), np.float32), mask=np.ones((16, 16)))
    dataset = client.post(
        "/v1/datasets",
        headers=auth,
        files={"file": ("images.npz", path.read_bytes())},
        data={"spec": json.dumps({"name": "d", "key": "images"})},
    ).json()
    ok = audit_request(
        model_id,
        dataset={"dataset_id": dataset["id"]},
        operator={"kind": "inpainting", "mask": {"dataset_id": dataset["id"], "key": "mask"}},
    )
    assert submit(client, auth, ok).status_code == 202
    bad_key = audit_request(
        model_id,
        operator={"kind": "inpainting", "mask": {"dataset_id": dataset["id"], "key": "nope"}},
    )
    body = assert_problem(submit(client, auth, bad_key), 422)
    assert body["errors"][0]["loc"] == ["body", "operator", "mask", "key"]
    other = new_key(client)
    other_model = ready_model(client, other, model_files.torchscript)
    foreign = audit_request(other_model, dataset={"dataset_id": dataset["id"]})
    assert_problem(submit(client, other, foreign), 422)


def test_idempotency_key_replays_and_refuses_other_bodies(
    client: TestClient,
    auth: dict[str, str],
    model_id: str,
    model_files: ModelFiles,
    broker: redis.Redis,
) -> None:
    body = audit_request(model_id)
    first = submit(client, auth, body, **{"Idempotency-Key": "abc-1"})
    queued = broker_count(broker)
    rows = count_audits(client)
    again = submit(client, auth, body, **{"Idempotency-Key": "abc-1"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert broker_count(broker) == queued and count_audits(client) == rows
    changed = submit(client, auth, audit_request(model_id, seed=7), **{"Idempotency-Key": "abc-1"})
    assert_problem(changed, 422, "idempotency-key-reused")
    # Another priority is another body; spelling out the default is the same one.
    urgent = submit(client, auth, {**body, "priority": "high"}, **{"Idempotency-Key": "abc-1"})
    assert_problem(urgent, 422, "idempotency-key-reused")
    spelled = submit(client, auth, {**body, "priority": "normal"}, **{"Idempotency-Key": "abc-1"})
    assert spelled.status_code == 202 and spelled.json()["id"] == first.json()["id"]
    # Keys are per tenant: another tenant's same key is a different audit.
    other = new_key(client)
    other_model = ready_model(client, other, model_files.torchscript)
    response = submit(client, other, audit_request(other_model), **{"Idempotency-Key": "abc-1"})
    assert response.status_code == 202 and response.json()["id"] != first.json()["id"]


def test_etag_and_not_modified(client: TestClient, auth: dict[str, str], model_id: str) -> None:
    audit_id = submit(client, auth, audit_request(model_id)).json()["id"]
    first = client.get(f"/v1/audits/{audit_id}", headers=auth)
    etag = first.headers["etag"]
    assert etag.startswith('"') and first.json()["id"] == audit_id
    cached = client.get(f"/v1/audits/{audit_id}", headers={**auth, "If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    set_audit(client, audit_id, status="running", progress_fraction=0.5, started_at=utcnow())
    changed = client.get(f"/v1/audits/{audit_id}", headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["progress"]["fraction"] == 0.5


def test_list_filters_and_pagination(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    ids = [submit(client, auth, audit_request(model_id, seed=i)).json()["id"] for i in range(3)]
    set_audit(client, ids[1], status="failed", finished_at=utcnow())
    page = client.get("/v1/audits", headers=auth, params={"page_size": 2}).json()
    assert [a["id"] for a in page["items"]] == [ids[2], ids[1]]
    rest = client.get(
        "/v1/audits", headers=auth, params={"page_size": 2, "page_token": page["next_page_token"]}
    ).json()
    assert [a["id"] for a in rest["items"]] == [ids[0]] and rest["next_page_token"] is None
    failed = client.get("/v1/audits", headers=auth, params={"status": "failed"}).json()
    assert [a["id"] for a in failed["items"]] == [ids[1]]
    by_model = client.get("/v1/audits", headers=auth, params={"model_id": "mdl_other"}).json()
    assert by_model["items"] == []
    assert_problem(client.get("/v1/audits", headers=auth, params={"page_token": "@@"}), 422)
    assert_problem(client.get("/v1/audits", headers=auth, params={"status": "nope"}), 422)
    assert client.get("/v1/audits", headers=new_key(client)).json()["items"] == []


def test_cancel(client: TestClient, auth: dict[str, str], model_id: str) -> None:
    queued = submit(client, auth, audit_request(model_id)).json()["id"]
    response = client.post(f"/v1/audits/{queued}/cancel", headers=auth)
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    assert_problem(client.post(f"/v1/audits/{queued}/cancel", headers=auth), 409, "audit-finished")

    running = submit(client, auth, audit_request(model_id, seed=1)).json()["id"]
    set_audit(client, running, status="running", started_at=utcnow())
    response = client.post(f"/v1/audits/{running}/cancel", headers=auth)
    assert response.status_code == 202 and response.json()["status"] == "running"
    with sessions_of(client)() as session:
        row = session.get(Audit, running)
        assert row is not None and row.cancel_requested

    assert_problem(client.post(f"/v1/audits/{running}/cancel", headers=new_key(client)), 404)
    assert_problem(client.post("/v1/audits/aud_nope/cancel", headers=auth), 404)


@pytest.mark.parametrize(
    ("device", "queue"), [("cuda", QUEUE_GPU), ("cpu", QUEUE_CPU), ("auto", QUEUE_CPU)]
)
def test_an_audit_goes_to_its_device_queue(
    client: TestClient,
    auth: dict[str, str],
    model_id: str,
    broker: redis.Redis,
    device: str,
    queue: str,
) -> None:
    """Only GPU workers read the GPU queue: a `cuda` audit must not wait in the CPU one."""
    response = submit(client, auth, audit_request(model_id, device=device))
    assert response.status_code == 202, response.text
    audit_id = response.json()["id"]
    ((key, message),) = sent_for(broker, audit_id)
    assert key in broker_keys(queue), (device, key)
    assert message["headers"]["task"] == "tightrope.run_audit"
    with sessions_of(client)() as session:
        row = session.get(Audit, audit_id)
        assert row is not None and row.queue == queue


def test_priority_orders_the_broker_lists(
    client: TestClient, auth: dict[str, str], model_id: str, broker: redis.Redis
) -> None:
    """A worker empties a queue's lower step first: `high` goes to step 0 (the queue's own list),
    `normal` and `low` to later steps, `low` last."""
    steps: dict[str, int] = {}
    for seed, priority in enumerate(("low", "high", "normal")):
        request = audit_request(model_id, seed=seed, device="cpu", priority=priority)
        response = submit(client, auth, request)
        assert response.status_code == 202, response.text
        assert response.json()["priority"] == priority
        audit_id = response.json()["id"]
        ((key, _),) = sent_for(broker, audit_id)
        steps[priority] = broker_keys(QUEUE_CPU).index(key)
        with sessions_of(client)() as session:
            row = session.get(Audit, audit_id)
            assert row is not None and row.priority == priority
        assert client.get(f"/v1/audits/{audit_id}", headers=auth).json()["priority"] == priority
    assert steps["high"] == 0 and broker_keys(QUEUE_CPU)[0] == QUEUE_CPU
    assert steps["high"] < steps["normal"] < steps["low"], steps
    body = assert_problem(submit(client, auth, audit_request(model_id, priority="urgent")), 422)
    assert body["errors"][0]["loc"] == ["body", "priority"]


def test_too_many_queued_audits_is_429_with_retry_after(
    tmp_path: Path, database_url: str, broker: redis.Redis, model_files: ModelFiles
) -> None:
    settings = make_settings(tmp_path, database_url, tenant_max_queued_audits=2)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        auth = new_key(client)
        model_id = ready_model(client, auth, model_files.torchscript)
        first = submit(client, auth, audit_request(model_id), **{"Idempotency-Key": "q-1"})
        assert first.status_code == 202, first.text
        assert submit(client, auth, audit_request(model_id, seed=1)).status_code == 202
        rows, messages = count_audits(client), broker_count(broker)

        refused = submit(client, auth, audit_request(model_id, seed=2))
        body = assert_problem(refused, 429, "too-many-audits")
        assert refused.headers["retry-after"] == "30"
        assert body["extra"] == {"limit": 2, "queued": 2}
        assert "2 audits queued" in body["detail"] and "limit is 2" in body["detail"]
        assert count_audits(client) == rows and broker_count(broker) == messages

        # A replay of a stored request is answered before the quota.
        again = submit(client, auth, audit_request(model_id), **{"Idempotency-Key": "q-1"})
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        # The quota is per tenant, and counts only audits waiting to start.
        other = new_key(client)
        other_model = ready_model(client, other, model_files.torchscript)
        assert submit(client, other, audit_request(other_model)).status_code == 202
        set_audit(client, first.json()["id"], status="running", started_at=utcnow())
        assert submit(client, auth, audit_request(model_id, seed=3)).status_code == 202
        refused = submit(client, auth, audit_request(model_id, seed=4))
        assert_problem(refused, 429, "too-many-audits")

        operation = client.get("/openapi.json").json()["paths"]["/v1/audits"]["post"]
        assert "429" in operation["responses"]


def test_status_shows_shard_progress_per_check(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    checks = [
        {"kind": "lipschitz", "iterations": 3},
        {"kind": "random_noise", "levels": [0.01], "samples": 2},
    ]
    audit_id = submit(client, auth, audit_request(model_id, checks=checks)).json()["id"]
    statements = count_queries(client)
    unplanned = client.get(f"/v1/audits/{audit_id}", headers=auth)
    assert unplanned.json()["shards"] == {"done": 0, "total": 0}
    assert unplanned.json()["checks"] is None
    assert not [s for s in statements if "audit_shards" in s]  # nothing to count yet

    add_shards(
        client,
        audit_id,
        (0, "lipschitz", "done"),
        (0, "lipschitz", "done"),
        (1, "random_noise", "done"),
        (1, "random_noise", "running"),
        (1, "random_noise", "queued"),
    )
    set_audit(client, audit_id, status="running", started_at=utcnow(), shards_total=5)
    set_audit(client, audit_id, shards_done=3)
    statements.clear()
    first = client.get(f"/v1/audits/{audit_id}", headers=auth)
    assert first.status_code == 200
    assert len([s for s in statements if "audit_shards" in s]) == 1, statements  # one grouped
    body = first.json()
    assert body["shards"] == {"done": 3, "total": 5}
    assert body["checks"] == [
        {"index": 0, "kind": "lipschitz", "shards_done": 2, "shards_total": 2, "finished": True},
        {
            "index": 1,
            "kind": "random_noise",
            "shards_done": 1,
            "shards_total": 3,
            "finished": False,
        },
    ]
    # A 304 builds no body, so it counts nothing either.
    etag = first.headers["etag"]
    statements.clear()
    cached = client.get(f"/v1/audits/{audit_id}", headers={**auth, "If-None-Match": etag})
    assert cached.status_code == 304
    assert not [s for s in statements if "audit_shards" in s], statements

    # A shard finishes: the worker bumps shards_done, and that alone changes the tag (here
    # updated_at is kept as it was, so nothing else in the columns moves).
    with sessions_of(client)() as session:
        session.execute(
            update(AuditShard)
            .where(AuditShard.audit_id == audit_id, AuditShard.shard_id == "1-random_noise-3")
            .values(status="done")
        )
        session.execute(
            update(Audit)
            .where(Audit.id == audit_id)
            .values(shards_done=Audit.shards_done + 1, updated_at=Audit.updated_at)
        )
        session.commit()
    changed = client.get(f"/v1/audits/{audit_id}", headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["shards"] == {"done": 4, "total": 5}
    assert changed.json()["checks"][1]["shards_done"] == 2

    # Lists and callbacks show the counts only.
    (listed,) = client.get("/v1/audits", headers=auth).json()["items"]
    assert listed["shards"] == {"done": 4, "total": 5} and listed["checks"] is None


def test_cancelling_a_running_audit_cancels_its_waiting_shards(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    running = submit(client, auth, audit_request(model_id)).json()["id"]
    other = submit(client, auth, audit_request(model_id, seed=1)).json()["id"]
    for audit_id in (running, other):
        set_audit(client, audit_id, status="running", started_at=utcnow(), shards_total=4)
        add_shards(
            client,
            audit_id,
            (0, "lipschitz", "done"),
            (0, "lipschitz", "running"),
            (0, "lipschitz", "queued"),
            (0, "lipschitz", "queued"),
        )
    response = client.post(f"/v1/audits/{running}/cancel", headers=auth)
    assert response.status_code == 202 and response.json()["status"] == "running"
    # Workers stop the running shard themselves; a finished one stays done.
    assert shard_statuses(client, running) == {
        "0-lipschitz-0": "done",
        "0-lipschitz-1": "running",
        "0-lipschitz-2": "cancelled",
        "0-lipschitz-3": "cancelled",
    }
    assert set(shard_statuses(client, other).values()) == {"done", "running", "queued"}
    with sessions_of(client)() as session:
        row = session.get(Audit, running)
        assert row is not None and row.cancel_requested


def test_cancelling_an_audit_with_no_shard_running_ends_it_at_once(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    """Between shards nobody holds the audit: the gateway ends it, or nobody would."""
    audit_id = submit(client, auth, audit_request(model_id)).json()["id"]
    set_audit(client, audit_id, status="running", started_at=utcnow(), shards_total=2)
    add_shards(client, audit_id, (0, "lipschitz", "done"), (0, "lipschitz", "queued"))
    response = client.post(f"/v1/audits/{audit_id}/cancel", headers=auth)
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert shard_statuses(client, audit_id) == {
        "0-lipschitz-0": "done",
        "0-lipschitz-1": "cancelled",
    }
    # A task holding the audit (planning or finalising) ends it itself instead.
    held = submit(client, auth, audit_request(model_id, seed=2)).json()["id"]
    set_audit(client, held, status="running", lease_owner="w", shards_total=0)
    response = client.post(f"/v1/audits/{held}/cancel", headers=auth)
    assert response.status_code == 202 and response.json()["status"] == "running"


def test_report_and_artifacts(
    client: TestClient, auth: dict[str, str], model_id: str, settings: Settings
) -> None:
    audit_id = submit(client, auth, audit_request(model_id)).json()["id"]
    assert_problem(
        client.get(f"/v1/audits/{audit_id}/report", headers=auth), 409, "report-not-ready"
    )

    folder = settings.artifact_dir / audit_id
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"verdict": "pass"}))
    (folder / "worst.npy").write_bytes(b"\x93NUMPY fake")
    with sessions_of(client)() as session:
        session.add(
            Artifact(
                audit_id=audit_id,
                name="worst.npy",
                media_type="application/x-npy",
                sha256="0" * 64,
                size_bytes=11,
                path=f"{audit_id}/worst.npy",
            )
        )
        session.commit()
    set_audit(
        client,
        audit_id,
        status="succeeded",
        verdict="pass",
        finished_at=utcnow(),
        report_path=f"{audit_id}/report.json",
    )
    status = client.get(f"/v1/audits/{audit_id}", headers=auth).json()
    assert status["links"]["report"] == f"/v1/audits/{audit_id}/report"
    assert status["links"]["cancel"] is None and status["verdict"] == "pass"
    report = client.get(f"/v1/audits/{audit_id}/report", headers=auth)
    assert report.status_code == 200 and report.json() == {"verdict": "pass"}
    artifact = client.get(f"/v1/audits/{audit_id}/artifacts/worst.npy", headers=auth)
    assert artifact.status_code == 200 and artifact.content == b"\x93NUMPY fake"
    assert artifact.headers["content-type"] == "application/x-npy"
    assert_problem(client.get(f"/v1/audits/{audit_id}/artifacts/report.json", headers=auth), 404)
    assert_problem(client.get(f"/v1/audits/{audit_id}/artifacts/..%2F..%2Fx", headers=auth), 404)
    assert_problem(client.get(f"/v1/audits/{audit_id}/artifacts/.hidden", headers=auth), 404)
    assert_problem(client.get(f"/v1/audits/{audit_id}/report.html", headers=auth), 404)
    other = new_key(client)
    assert_problem(client.get(f"/v1/audits/{audit_id}/report", headers=other), 404)
    assert_problem(client.get(f"/v1/audits/{audit_id}/artifacts/worst.npy", headers=other), 404)


def test_failed_audit_shows_its_problem(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    audit_id = submit(client, auth, audit_request(model_id)).json()["id"]
    error = {
        "type": "https://tightrope.dev/problems/model-crashed",
        "title": "The model crashed",
        "status": 500,
        "detail": "the runner exited with signal 9",
    }
    set_audit(client, audit_id, status="failed", error=error, attempts=3, finished_at=utcnow())
    body = client.get(f"/v1/audits/{audit_id}", headers=auth).json()
    assert body["error"]["detail"] == error["detail"] and body["attempts"] == 3


@pytest.mark.parametrize(
    "check",
    [
        {"kind": "worst_case", "levels": [0.01], "steps": 2},
        {"kind": "random_noise", "levels": [0.01], "samples": 2},
        {"kind": "false_negative", "lesion": {"shape": "disk", "size": 2, "contrast": 0.3}},
        {"kind": "false_positive"},
        {"kind": "kernel"},
        {"kind": "more_samples", "accelerations": [8, 4]},
    ],
    ids=lambda check: check["kind"],
)
def test_every_reconstruction_check_is_accepted_with_its_defaults_filled_in(
    client: TestClient, auth: dict[str, str], model_id: str, check: dict[str, Any]
) -> None:
    response = submit(client, auth, audit_request(model_id, checks=[check]))
    assert response.status_code == 202, response.text
    with sessions_of(client)() as session:
        audit = session.get(Audit, response.json()["id"])
        assert audit is not None
        (stored,) = audit.request["checks"]
    assert stored["kind"] == check["kind"]
    assert set(check) <= set(stored)  # the canonical request keeps what was given, plus defaults


def test_a_sampling_list_for_another_operator_is_refused_at_submission(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    """The request's audit_request uses an MRI operator: angles (radon) cannot vary it. Refused
    with 422 now, not by the worker after a 202."""
    check = {"kind": "more_samples", "angles": [4, 8]}
    response = submit(client, auth, audit_request(model_id, checks=[check]))
    body = assert_problem(response, 422, "validation-failed")
    assert "angles apply to the radon operator, not 'mri'" in body["detail"]


# callback_url may not reach inside (docs/security.md, "Callbacks"). Names resolve through this
# fake resolver; every other lookup (the databases, Redis) goes to the real one.
INTERNAL_CALLBACKS = [
    "http://127.0.0.1:8080/hook",
    "http://0x7f000001:8080/hook",
    "http://2130706433/hook",
    "http://017700000001/hook",
    "http://127.1/hook",
    "http://0x7f.1/hook",
    "http://[::ffff:127.0.0.1]/hook",
    # IPv6 transition forms judged by the IPv4 address they embed
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[2002:a9fe:a9fe::]/",  # 6to4 of 169.254.169.254
    "http://[2002:c0a8:101::1]/hook",  # 6to4 of 192.168.1.1
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook",  # Teredo, client 127.0.0.1
    "http://[::127.0.0.1]/hook",  # IPv4-compatible
    "http://[::a9fe:a9fe]/hook",  # IPv4-compatible 169.254.169.254
    "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 well-known prefix
    "http://[64:ff9b:1::7f00:1]/hook",  # NAT64 local-use prefix
    "http://[2606:2800:220:1:0:5efe:7f00:1]/hook",  # ISATAP of 127.0.0.1 on a public prefix
    "http://[2606:2800:220:1:200:5efe:a00:1]/hook",  # ISATAP of 10.0.0.1
    "http://[::1]:8080/hook",
    "http://[::]/hook",
    "http://0.0.0.0/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/hook",
    "http://192.168.0.1/hook",
    "http://[fd00::1]/hook",
    "http://[fe80::1]/hook",
    "http://224.0.0.1/hook",
    "http://240.0.0.1/hook",
    "http://localhost:6379/",
    "http://localhost./hook",
    "https://LOCALHOST/hook",
    "http://api.localhost/hook",
    "http://inside.example.test/hook",  # resolves to a private address
    "http://mixed.example.test./hook",  # one public, one loopback address
]
FAKE_DNS = {
    "inside.example.test": ["10.0.0.5"],
    "mixed.example.test": ["93.184.216.34", "127.0.0.1"],
    "public.example.test": ["93.184.216.34", "2606:2800:220:1::1"],
}


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    real = socket.getaddrinfo
    table = dict(FAKE_DNS)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "nowhere.example.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == "slow.example.test":
            time.sleep(2)
        if host not in table:
            return real(host, port, *args, **kwargs)
        return [
            (
                socket.AF_INET6 if ":" in ip else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (ip, int(port or 0)),
            )
            for ip in table[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def test_internal_callback_urls_are_refused(
    client: TestClient,
    auth: dict[str, str],
    model_id: str,
    broker: redis.Redis,
    fake_dns: dict[str, list[str]],
) -> None:
    before_rows, before_messages = count_audits(client), broker_count(broker)
    for url in INTERNAL_CALLBACKS:
        response = submit(client, auth, audit_request(model_id, callback_url=url))
        body = assert_problem(response, 422, "validation-failed")
        assert body["detail"].startswith("callback_url: "), (url, body)
        assert [e["loc"] for e in body["errors"]] == [["body", "callback_url"]], (url, body)
        assert "address" in body["detail"] or "loopback name" in body["detail"], (url, body)
    assert count_audits(client) == before_rows and broker_count(broker) == before_messages


def test_unresolvable_callback_host_is_refused(
    client: TestClient,
    auth: dict[str, str],
    model_id: str,
    fake_dns: dict[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = submit(
        client, auth, audit_request(model_id, callback_url="https://nowhere.example.test/h")
    )
    body = assert_problem(missing, 422, "validation-failed")
    assert body["errors"][0]["loc"] == ["body", "callback_url"]
    assert "does not resolve" in body["detail"]
    # a resolver that hangs costs the request at most the resolution timeout
    monkeypatch.setattr("service.domain.audit_rules.CALLBACK_RESOLVE_SECONDS", 0.2)
    started = time.monotonic()
    slow = submit(client, auth, audit_request(model_id, callback_url="http://slow.example.test/"))
    assert time.monotonic() - started < 1.5
    body = assert_problem(slow, 422, "validation-failed")
    assert "did not resolve within" in body["detail"]


def test_public_callback_url_is_accepted(
    client: TestClient, auth: dict[str, str], model_id: str, fake_dns: dict[str, list[str]]
) -> None:
    # Only checked, never contacted: submission resolves, it sends nothing.
    for url in (
        "http://93.184.216.34/hook",
        "https://public.example.test/hook?x=1",
        "http://[2002:5db8:d822::1]/hook",  # 6to4 of the public 93.184.216.34
        "http://[64:ff9b::5db8:d822]/hook",  # NAT64 of the same
    ):
        response = submit(client, auth, audit_request(model_id, callback_url=url))
        assert response.status_code == 202, response.text
        with sessions_of(client)() as session:
            audit = session.get(Audit, response.json()["id"])
            assert audit is not None and audit.request["callback_url"] == url


def test_allow_list_lets_a_named_internal_callback_through(
    tmp_path: Path, database_url: str, broker: redis.Redis, model_files: ModelFiles
) -> None:
    settings = make_settings(
        tmp_path, database_url, callback_allow="127.0.0.1:8123, 10.9.0.0/16, localhost:7000"
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        auth = new_key(client)
        model_id = ready_model(client, auth, model_files.torchscript)
        for url in (
            "http://127.0.0.1:8123/hook",
            "http://0x7f000001:8123/hook",
            "http://10.9.8.7/hook",
            "http://localhost:7000/hook",
        ):
            response = submit(client, auth, audit_request(model_id, callback_url=url))
            assert response.status_code == 202, (url, response.text)
        for url in ("http://127.0.0.1:8124/hook", "http://10.8.0.1/", "http://localhost:7001/"):
            refused = submit(client, auth, audit_request(model_id, callback_url=url))
            body = assert_problem(refused, 422, "validation-failed")
            assert body["errors"][0]["loc"] == ["body", "callback_url"], url


def test_a_bad_allow_list_entry_is_a_settings_error(tmp_path: Path) -> None:
    for entry in ("127.0.0.1:http", "[::1", "hooks.example.test:0", "a/b"):
        with pytest.raises(ValueError, match="allow-list entry"):
            make_settings(tmp_path, "sqlite://", callback_allow=entry)
