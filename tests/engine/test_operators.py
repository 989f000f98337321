from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter

from schemas.operators import Operator
from workers.engine.operators import build_operator
from workers.shared.errors import EngineInputError

OPERATORS = TypeAdapter(Operator)

CASES = [
    ({"kind": "mri"}, (2, 16, 16)),
    ({"kind": "mri", "mask": "random_lines", "seed": 3}, (2, 16, 16)),
    ({"kind": "mri", "mask": "variable_density"}, (2, 16, 16)),
    ({"kind": "mri", "mask": "radial", "acceleration": 3}, (2, 16, 16)),
    ({"kind": "mri"}, (1, 16, 16)),  # real images enter as (x, 0)
    ({"kind": "radon", "angles": 6}, (1, 16, 16)),
    ({"kind": "radon", "angles": [0.0, 45.0, 90.0]}, (1, 16, 16)),
    ({"kind": "gaussian", "m": 40, "seed": 2}, (1, 8, 8)),
    ({"kind": "inpainting", "fraction": 0.3}, (1, 16, 16)),
    ({"kind": "blur", "sigma": 1.5, "size": 5}, (1, 16, 16)),
    ({"kind": "blur", "kernel": "box", "size": 3}, (3, 16, 16)),
    ({"kind": "denoising"}, (1, 16, 16)),
]


def build(cfg: dict, shape: tuple[int, int, int], base_dir: Path | None = None):
    return build_operator(OPERATORS.validate_python(cfg), shape, "cpu", base_dir)


@pytest.mark.parametrize(("cfg", "shape"), CASES)
def test_adjoint_is_the_adjoint_on_measured_entries(cfg: dict, shape: tuple) -> None:
    op = build(cfg, shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, *shape), generator=gen, dtype=torch.float64).float()
    y = op.project(torch.randn((3, *op.measurement_shape), generator=gen))
    ax = op.A(x)
    assert tuple(ax.shape[1:]) == op.measurement_shape
    lhs = (ax * y).flatten(1).sum(1)
    rhs = (x * op.A_adjoint(y)).flatten(1).sum(1)
    scale = ax.flatten(1).norm(dim=1) * y.flatten(1).norm(dim=1)
    assert torch.all((lhs - rhs).abs() <= 1e-5 * scale)


@pytest.mark.parametrize(("cfg", "shape"), CASES)
def test_project_is_idempotent_and_A_only_fills_measured_entries(cfg: dict, shape: tuple) -> None:
    op = build(cfg, shape)
    e = torch.randn((2, *op.measurement_shape), generator=torch.Generator().manual_seed(1))
    once = op.project(e)
    assert torch.equal(op.project(once), once)
    y = op.A(torch.rand((2, *shape), generator=torch.Generator().manual_seed(2)))
    assert torch.equal(op.project(y), y)
    assert torch.allclose(op.norm(e), once.flatten(1).norm(dim=1))


def test_mri_mask_samples_one_entry_in_acceleration() -> None:
    # 32 columns, ×4: int(0.08·32) = 2 centre lines + 32/4 − 2 = 6 others: 8 columns of 32 rows
    op = build({"kind": "mri", "acceleration": 4, "center_fraction": 0.08}, (2, 32, 32))
    assert op.measured_entries == 2 * 8 * 32
    assert op.mask is not None and op.mask[0, :, 16].sum() == 32  # the centre line


@pytest.mark.parametrize("mask", ["cartesian", "random_lines", "variable_density", "radial"])
def test_mri_masks_are_seeded(mask: str) -> None:
    first = build({"kind": "mri", "mask": mask, "seed": 5}, (2, 16, 16)).mask
    again = build({"kind": "mri", "mask": mask, "seed": 5}, (2, 16, 16)).mask
    assert first is not None and again is not None
    assert torch.equal(first, again)
    assert first.sum() >= 2 * 16 * 16 / 4 - 1e-9  # at least 1/acceleration of k-space


def test_mri_is_an_isometry_on_sampled_entries() -> None:
    op = build({"kind": "mri", "mask": "variable_density"}, (2, 16, 16))
    e = op.project(torch.randn((4, 2, 16, 16), generator=torch.Generator().manual_seed(3)))
    assert torch.allclose(op.A_adjoint(e).flatten(1).norm(dim=1), op.norm(e), rtol=1e-5)


@pytest.mark.parametrize("mask", ["cartesian", "random_lines", "variable_density", "radial"])
def test_mri_on_real_images_keeps_half_the_energy_of_random_perturbations(mask: str) -> None:
    # A* e = Re(F* M e) for real 1-channel images. With w = F* M e, ‖w‖ = ‖e‖ and
    # ‖Re w‖² = (‖w‖² + Re Σ wᵢ²)/2, where E[wᵢ²] = 0 for e with independent real and imaginary
    # parts of equal variance: E‖A*e‖² = E‖e‖²/2 exactly, for any mask (docs/operators.md)
    op = build({"kind": "mri", "mask": mask}, (1, 32, 32))
    e = op.project(torch.randn((256, 2, 32, 32), generator=torch.Generator().manual_seed(4)))
    kept = op.A_adjoint(e).flatten(1).norm(dim=1)
    assert bool((kept <= op.norm(e) * (1 + 1e-5)).all())  # the real part never gains energy
    energy = float(kept.square().sum() / op.norm(e).square().sum())
    assert energy == pytest.approx(0.5, abs=0.01)
    assert float((kept / op.norm(e)).mean()) == pytest.approx(2**-0.5, abs=0.01)


def test_mri_explicit_mask_file(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, [0, 3, 4]] = 1
    np.save(tmp_path / "mask.npy", mask)
    op = build({"kind": "mri", "mask": {"file": "mask.npy"}}, (2, 8, 8), base_dir=tmp_path)
    assert op.measured_entries == 2 * 8 * 3


def test_explicit_gaussian_matrix(tmp_path: Path) -> None:
    matrix = np.arange(12 * 16, dtype=np.float32).reshape(12, 16) / 100
    np.savez(tmp_path / "m.npz", first=np.zeros(1), matrix=matrix)
    op = build(
        {"kind": "gaussian", "matrix": {"file": "m.npz", "key": "matrix"}}, (1, 4, 4), tmp_path
    )
    x = torch.rand(2, 1, 4, 4)
    assert op.measurement_shape == (12,)
    assert torch.allclose(op.A(x), x.flatten(1) @ torch.from_numpy(matrix).T)


def test_inpainting_keeps_the_requested_fraction() -> None:
    op = build({"kind": "inpainting", "fraction": 0.25, "seed": 4}, (2, 16, 16))
    assert op.measured_entries == 2 * 64


@pytest.mark.parametrize(
    ("cfg", "shape", "message"),
    [
        ({"kind": "mri"}, (3, 16, 16), "2 channels"),
        ({"kind": "radon"}, (1, 16, 12), "square"),
        ({"kind": "gaussian", "m": 65536}, (1, 64, 64), "matrix entries"),
        ({"kind": "blur", "size": 33}, (1, 16, 16), "larger than the images"),
        ({"kind": "mri", "mask": {"file": "missing.npy"}}, (2, 8, 8), "no such file"),
        ({"kind": "mri", "mask": {"dataset_id": "abc"}}, (2, 8, 8), "not resolved"),
    ],
)
def test_invalid_combinations_raise_engine_input_error(
    cfg: dict, shape: tuple, message: str, tmp_path: Path
) -> None:
    with pytest.raises(EngineInputError, match=message):
        build(cfg, shape, tmp_path)


def test_pickled_and_non_binary_masks_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(EngineInputError, match="not a plain numeric array"):
        build({"kind": "mri", "mask": {"file": "obj.npy"}}, (2, 8, 8), tmp_path)
    (tmp_path / "p.npy").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(EngineInputError):
        build({"kind": "mri", "mask": {"file": "p.npy"}}, (2, 8, 8), tmp_path)
    np.save(tmp_path / "half.npy", np.full((8, 8), 0.5))
    with pytest.raises(EngineInputError, match="only 0 and 1"):
        build({"kind": "inpainting", "mask": {"file": "half.npy"}}, (1, 8, 8), tmp_path)
