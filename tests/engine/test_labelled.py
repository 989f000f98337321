"""Labelled datasets: the built-in digits, labels from .npz files, and classifier audits that
do not fit their model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.audits import AuditConfig
from schemas.datasets import BuiltinDataset, FileDataset
from tests.engine.classifier_fixtures import LogitDifference, spec
from tests.engine.tiny_models import Identity
from tests.engine.tiny_models import spec as reconstruction_spec
from workers.engine.audit import run_audit_with_model
from workers.engine.digits import digits
from workers.engine.ground_truth import load_images
from workers.engine.labelled import load_labelled
from workers.shared.errors import EngineInputError


def test_digits_are_seeded_balanced_and_in_range() -> None:
    images, labels = digits(30, 16, seed=2)
    assert images.shape == (30, 1, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 10
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    again, same = digits(30, 16, seed=2)
    assert torch.equal(images, again) and torch.equal(labels, same)
    assert not torch.equal(images, digits(30, 16, seed=3)[0])
    # a digit is drawn: bright strokes on a dark background
    assert float(images.mean()) < 0.4 and float(images.amax(dim=(1, 2, 3)).min()) > 0.5
    ref = BuiltinDataset(builtin="digits", count=30, size=16, seed=2)
    assert torch.equal(load_images(ref), images)


def test_digits_of_one_class_look_alike() -> None:
    """The classes are told apart by shape: the nearest class mean classifies most of a fresh
    set (a check that images and labels agree)."""
    train_x, train_y = digits(200, 16, seed=0)
    test_x, test_y = digits(50, 16, seed=1)
    means = torch.stack([train_x[train_y == c].mean(dim=0).flatten() for c in range(10)])
    predicted = torch.cdist(test_x.flatten(1), means).argmin(dim=1)
    assert float((predicted == test_y).float().mean()) > 0.4  # chance: 0.1


def save_npz(path: Path, **arrays: np.ndarray) -> FileDataset:
    np.savez(path, **arrays)
    return FileDataset(file=str(path))


def test_labels_from_an_npz(tmp_path: Path) -> None:
    images = np.zeros((4, 1, 8, 8), dtype=np.float32)
    ref = save_npz(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 2, 1]))
    x, labels = load_labelled(ref, None, num_classes=3)
    assert x.shape == (4, 1, 8, 8) and labels.tolist() == [0, 1, 2, 1]
    np.savez(tmp_path / "k.npz", images=images, classes=np.array([1, 1, 0, 0]))
    ref = FileDataset(file="k.npz", labels_key="classes")
    assert load_labelled(ref, tmp_path, num_classes=2)[1].tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, 3, 1]), r"labels must lie in \[0, 3\)"),
        (np.array([0, 1, 2]), "3 labels for 4 images"),
        (np.array([0.0, 1.0, 2.0, 1.0]), "1-D integer array"),
        (np.array([[0, 1, 2, 1]]), "1-D integer array"),
        (np.array([-1, 1, 2, 1]), r"must be class indices >= 0 \(found -1\)"),
    ],
)
def test_bad_labels_are_named(tmp_path: Path, labels: np.ndarray, message: str) -> None:
    images = np.zeros((4, 1, 8, 8), dtype=np.float32)
    ref = save_npz(tmp_path / "d.npz", images=images, labels=labels)
    with pytest.raises(EngineInputError, match=message):
        load_labelled(ref, None, num_classes=3)


def test_datasets_without_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineInputError, match="has no labels"):
        load_labelled(BuiltinDataset(builtin="ellipses"), None, num_classes=3)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), dtype=np.float32))
    with pytest.raises(EngineInputError, match="needs labels"):
        load_labelled(FileDataset(file=str(tmp_path / "x.npy")), None, num_classes=3)
    ref = save_npz(tmp_path / "n.npz", images=np.zeros((2, 1, 8, 8), dtype=np.float32))
    with pytest.raises(EngineInputError, match="no array 'labels'"):
        load_labelled(ref, None, num_classes=3)


def test_checks_must_fit_the_models_task(tmp_path: Path) -> None:
    classifier = LogitDifference(torch.ones(64), 0.0)
    digits_8 = {"builtin": "digits", "count": 4, "size": 8}
    shape = (1, 8, 8)
    wrong = AuditConfig.model_validate(
        {"dataset": digits_8, "checks": [{"kind": "lipschitz"}], "device": "cpu"}
    )
    with pytest.raises(EngineInputError, match="lipschitz audit reconstruction models"):
        run_audit_with_model(
            classifier, spec(10, shape=shape), wrong, out_dir=tmp_path, model_sha256="a"
        )
    few_classes = AuditConfig.model_validate(
        {"dataset": digits_8, "checks": [{"kind": "adversarial"}], "device": "cpu"}
    )
    with pytest.raises(EngineInputError, match=r"labels must lie in \[0, 2\)"):
        run_audit_with_model(
            classifier, spec(2, shape=shape), few_classes, out_dir=tmp_path, model_sha256="a"
        )
    no_operator = AuditConfig.model_validate(
        {
            "dataset": {"builtin": "ellipses", "count": 2, "size": 8},
            "checks": [{"kind": "adversarial"}],
            "device": "cpu",
        }
    )
    with pytest.raises(EngineInputError, match="needs an operator") as raised:
        run_audit_with_model(
            Identity(),
            reconstruction_spec((1, 8, 8)),
            no_operator,
            out_dir=tmp_path,
            model_sha256="a",
        )
    assert "adversarial audit classifiers" in str(raised.value)
