"""A classifier audit end to end: a labelled `.npz` uploaded over HTTP reaches the sandboxed
runner with its labels, through a real worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures import model_factory
from tests.integration.conftest import client_for

pytestmark = pytest.mark.integration


def test_uploaded_labels_reach_the_classifier_audit(make_stack, tmp_path: Path) -> None:
    model_path = model_factory.tiny_classifier_torchscript(tmp_path / "classifier.pt")
    images = np.random.default_rng(0).uniform(0.2, 0.8, size=(8, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        predicted = model_factory.build_tiny_classifier()(torch.from_numpy(images)).argmax(1)
    labels = predicted.numpy().astype(np.int64)
    labels[:2] = (labels[:2] + 1) % 3  # two wrong labels: the clean accuracy is exactly 6/8
    data_path = tmp_path / "labelled.npz"
    np.savez(data_path, images=images, labels=labels)

    stack = make_stack(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with client_for(stack) as client:
        model = client.upload_model(model_path, model_factory.classifier_spec())
        assert client.wait_model(model["id"], timeout=120)["status"] == "ready"
        dataset = client.upload_dataset(data_path, {"name": "labelled"})
        submitted = client.submit_audit(
            {
                "model_id": model["id"],
                "dataset": {"dataset_id": dataset["id"]},
                "checks": [{"kind": "random_noise", "levels": [0.01], "samples": 2}],
                "seed": 0,
                "device": "cpu",
            }
        )
        final = client.wait_audit(submitted["id"], timeout=240)
        assert final["status"] == "succeeded", final.get("error")
        (result,) = client.get_report(submitted["id"])["checks"]
    assert result["task"] == "classification"
    assert result["clean_accuracy"] == 0.75
