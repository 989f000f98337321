from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter

from schemas.datasets import DatasetRef
from tests.engine.tiny_models import spec
from workers.engine.ground_truth import fit_images_to_spec, load_images
from workers.shared.errors import EngineInputError

REFS = TypeAdapter(DatasetRef)


def load(ref: dict, base_dir: Path | None = None) -> torch.Tensor:
    return load_images(REFS.validate_python(ref), base_dir)


def test_ellipses_are_seeded_and_in_unit_range() -> None:
    first = load({"builtin": "ellipses", "count": 3, "size": 16, "seed": 7})
    assert first.shape == (3, 1, 16, 16) and first.dtype == torch.float32
    assert torch.equal(first, load({"builtin": "ellipses", "count": 3, "size": 16, "seed": 7}))
    assert not torch.equal(first, load({"builtin": "ellipses", "count": 3, "size": 16, "seed": 8}))
    assert first.min() >= 0 and first.max() <= 1 and first.std() > 0.05
    assert not torch.equal(first[0], first[1])


def test_shepp_logan() -> None:
    images = load({"builtin": "shepp_logan", "count": 2, "size": 32})
    assert images.shape == (2, 1, 32, 32)
    assert images.max() == 1.0 and images.min() == 0.0
    assert torch.equal(images[0], images[1])


def test_npy_without_channels_gains_one(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((5, 8, 8), dtype=np.float64))
    images = load({"file": "x.npy"}, tmp_path)
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.float32


def test_npz_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", labels=np.zeros(3), images=np.full((2, 2, 8, 8), 0.5))
    assert load({"file": "d.npz", "key": "images"}, tmp_path).shape == (2, 2, 8, 8)
    with pytest.raises(EngineInputError, match="4-D|\\[N, C, H, W\\]"):
        load({"file": "d.npz"}, tmp_path)  # the first array, labels, is 1-D


def test_uploaded_refs_never_reach_the_engine() -> None:
    with pytest.raises(EngineInputError, match="not resolved"):
        load({"dataset_id": "ds_1"})


def test_real_images_feed_a_complex_model_as_real_and_zero() -> None:
    images = torch.rand(2, 1, 8, 8)
    fitted = fit_images_to_spec(images, spec((2, 8, 8), complex=True))
    assert torch.equal(fitted[:, 0:1], images) and torch.equal(fitted[:, 1], torch.zeros(2, 8, 8))


@pytest.mark.parametrize(
    ("shape", "message"), [((1, 16, 16), "expects 16×16"), ((3, 8, 8), "expects 3")]
)
def test_images_must_match_the_spec(shape: tuple[int, int, int], message: str) -> None:
    with pytest.raises(EngineInputError, match=message):
        fit_images_to_spec(torch.rand(2, 1, 8, 8), spec(shape))


def test_local_files_follow_the_upload_rules(tmp_path: Path) -> None:
    """The same rules (schemas.archive_rules) as the gateway's upload check."""
    np.save(tmp_path / "c.npy", np.zeros((2, 8, 8), np.complex64))
    with pytest.raises(EngineInputError, match="complex dtype complex64; store"):
        load({"file": "c.npy"}, tmp_path)
    np.save(tmp_path / "many.npy", np.zeros((4097, 1, 1), np.uint8))
    with pytest.raises(EngineInputError, match="holds 4097 images; between 1 and 4096"):
        load({"file": "many.npy"}, tmp_path)
