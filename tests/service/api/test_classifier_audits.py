"""Classifier audits at the gateway: no operator, labelled datasets, checks that fit the task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from tests.fixtures import model_factory
from tests.service.api.test_dataset_routes import npz_bytes, upload
from tests.service.conftest import assert_problem, set_model_status, upload_model


def classifier_model(client: TestClient, auth: dict[str, str], tmp_path: Path) -> str:
    path = model_factory.tiny_classifier_torchscript(tmp_path / "clf.pt", num_classes=10)
    response = upload_model(client, auth, path, model_factory.classifier_spec(num_classes=10))
    assert response.status_code == 202, response.text
    model_id: str = response.json()["id"]
    set_model_status(client, model_id, "ready")
    return model_id


def submit(client: TestClient, auth: dict[str, str], model_id: str, **fields: Any) -> Any:
    body: dict[str, Any] = {
        "model_id": model_id,
        "dataset": {"builtin": "digits", "count": 4, "size": 16},
        "checks": [{"kind": "adversarial", "epsilons": [0.01]}, {"kind": "random_noise"}],
    }
    body.update(fields)
    return client.post("/v1/audits", headers=auth, json=body)


def test_classifier_audit_without_operator_is_accepted(
    client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    model_id = classifier_model(client, auth, tmp_path)
    response = submit(client, auth, model_id)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"


def test_checks_and_datasets_must_fit_the_task(
    client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    model_id = classifier_model(client, auth, tmp_path)
    body = assert_problem(submit(client, auth, model_id, checks=[{"kind": "lipschitz"}]), 422)
    assert "lipschitz audit reconstruction models" in body["detail"]
    unlabelled = {"builtin": "ellipses", "count": 2, "size": 16}
    body = assert_problem(submit(client, auth, model_id, dataset=unlabelled), 422)
    assert "has no labels" in body["detail"]
    # a reconstruction model needs an operator and refuses classifier checks
    recon = upload_model(client, auth, model_factory.tiny_cnn_torchscript(tmp_path / "r.pt"))
    set_model_status(client, recon.json()["id"], "ready")
    body = assert_problem(submit(client, auth, recon.json()["id"]), 422)
    assert "needs an operator" in body["detail"]
    assert "adversarial audit classifiers" in body["detail"]


def test_uploaded_labels_are_recorded_and_checked(
    client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    images = np.zeros((4, 1, 16, 16), dtype=np.float32)
    response = upload(client, auth, "d.npz", npz_bytes(images=images, labels=np.arange(4)))
    assert response.status_code == 201, response.text
    assert response.json()["labels"] == {"key": "labels", "count": 4, "min": 0, "max": 3}
    model_id = classifier_model(client, auth, tmp_path)
    dataset = {"dataset_id": response.json()["id"]}
    assert submit(client, auth, model_id, dataset=dataset).status_code == 202

    too_many = upload(client, auth, "e.npz", npz_bytes(images=images, labels=np.arange(4) * 5))
    body = assert_problem(
        submit(client, auth, model_id, dataset={"dataset_id": too_many.json()["id"]}), 422
    )
    assert "labels up to 15" in body["detail"]
    bad = upload(client, auth, "f.npz", npz_bytes(images=images, labels=np.ones(3, dtype=np.int64)))
    assert "3 labels for 4 images" in assert_problem(bad, 422, "invalid-upload")["detail"]
    floats = npz_bytes(images=images, labels=np.zeros(4))
    assert (
        "integer array of class indices"
        in assert_problem(upload(client, auth, "g.npz", floats), 422)["detail"]
    )
    plain = upload(client, auth, "h.npz", npz_bytes(images=images))
    assert plain.json()["labels"] is None
    body = assert_problem(
        submit(client, auth, model_id, dataset={"dataset_id": plain.json()["id"]}), 422
    )
    assert "has no labels" in body["detail"]
