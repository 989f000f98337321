"""`compare_with` in `POST /v1/audits`: the reference model must be the tenant's, ready and
audited on the same inputs; problems name `compare_with.model_id`."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.db.tables import Audit
from tests.service.api.test_audit_routes import audit_request, submit
from tests.service.conftest import (
    SPEC,
    ModelFiles,
    assert_problem,
    new_key,
    ready_model,
    sessions_of,
    set_model_status,
    upload_model,
)

LOC = ["body", "compare_with", "model_id"]


def test_compare_with_is_stored_for_the_workers(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    model = ready_model(client, auth, model_files.torchscript)
    reference = ready_model(client, auth, model_files.torchscript)
    request = audit_request(model, compare_with={"model_id": reference})
    request["checks"] = [
        {"kind": "lipschitz", "threshold": {"max_jacobian_norm": 9, "max_regression": 0.2}}
    ]
    response = submit(client, auth, request)
    assert response.status_code == 202, response.text
    with sessions_of(client)() as session:
        audit = session.get(Audit, response.json()["id"])
        assert audit is not None
        assert audit.request["compare_with"] == {"model_id": reference}
        assert audit.request["checks"][0]["threshold"]["max_regression"] == 0.2
    # without compare_with the stored request has no trace of it
    plain = submit(client, auth, audit_request(model)).json()["id"]
    with sessions_of(client)() as session:
        stored = session.get(Audit, plain)
        assert stored is not None and "compare_with" not in stored.request


def test_the_reference_must_be_known_ready_and_the_tenants(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    model = ready_model(client, auth, model_files.torchscript)
    body = assert_problem(
        submit(client, auth, audit_request(model, compare_with={"model_id": "mdl_nope"})), 422
    )
    assert body["errors"][0]["loc"] == LOC
    pending = upload_model(client, auth, model_files.torchscript).json()["id"]
    request = audit_request(model, compare_with={"model_id": pending})
    body = assert_problem(submit(client, auth, request), 409, "model-not-ready")
    assert "compare_with" in body["detail"]
    set_model_status(client, pending, "rejected", "bad weights")
    body = assert_problem(submit(client, auth, request), 409, "model-not-ready")
    assert "bad weights" in body["detail"]
    other = new_key(client)
    foreign = ready_model(client, other, model_files.torchscript)
    body = assert_problem(
        submit(client, auth, audit_request(model, compare_with={"model_id": foreign})), 422
    )
    assert body["errors"][0]["loc"] == LOC
    body = assert_problem(submit(client, auth, audit_request(model, compare_with={})), 422)


def test_the_reference_must_have_the_same_spec_shapes(
    client: TestClient, auth: dict[str, str], model_files: ModelFiles
) -> None:
    model = ready_model(client, auth, model_files.torchscript)
    other_spec = {**SPEC, "image_shape": [SPEC["image_shape"][0], 8, 8]}
    response = upload_model(client, auth, model_files.torchscript, spec=other_spec)
    assert response.status_code == 202, response.text
    reference = response.json()["id"]
    set_model_status(client, reference, "ready")
    body = assert_problem(
        submit(client, auth, audit_request(model, compare_with={"model_id": reference})), 422
    )
    assert body["errors"][0]["loc"] == LOC
    assert "image_shape" in body["detail"]
