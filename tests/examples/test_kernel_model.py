"""The shipped "troublesome kernel" model (examples/kernel): its pairs are near-kernel pairs of
the MRI operator, the network recovers both members of each, and the universal instability
theorem's conditions hold, so the proven bound on the local Lipschitz constant is large. The
bound is computed here from the theorem, not with the engine's `certify`. No training here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.audits import AuditConfig
from schemas.model_spec import ModelSpec
from schemas.operators import MRIOperator
from workers.engine.model_loading import admit, load_model
from workers.engine.operators import LinearOperator, build_operator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KERNEL = EXAMPLES / "kernel"
MAX_BYTES = 10 * 1024 * 1024
PAIRS = 4
# The construction (examples/train_kernel_model.py): ‖Ax − Ax'‖ = VISIBLE exactly (up to float32),
# ‖x − x'‖ = the disk's null-space part (plus the visible part), the same for every pair.
VISIBLE = 0.25
MIN_DISTANCE = 2.5
# Measured when the weights were shipped: 8.3 (docs/case-study.md); wrong weights or pairs land far
# below (the reference model certifies nothing on these pairs).
MIN_BEST_BOUND = 6.0


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.model_validate(json.loads((KERNEL / "spec.json").read_text()))


@pytest.fixture(scope="module")
def operator(spec: ModelSpec) -> LinearOperator:
    audit = json.loads((EXAMPLES / "reference" / "audit.json").read_text())
    return build_operator(MRIOperator.model_validate(audit["operator"]), spec.image_shape)


@pytest.fixture(scope="module")
def pairs() -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(KERNEL / "pairs.npz", allow_pickle=False) as data:
        images = torch.from_numpy(data["images"])
    assert images.dtype == torch.float32 and tuple(images.shape) == (2 * PAIRS, 1, 64, 64)
    return images[:PAIRS], images[PAIRS:]


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.double().flatten(1).norm(dim=1)


def _kspace_distance(
    operator: LinearOperator, x: torch.Tensor, x_other: torch.Tensor
) -> torch.Tensor:
    """‖Ax − Ax'‖ from its definition, not through deepinv: the centred unitary 2-D FFT of the
    difference on the sampled entries of the cartesian mask."""
    kspace = torch.fft.fftshift(
        torch.fft.fft2((x - x_other)[:, 0].double(), norm="ortho"), dim=(-2, -1)
    )
    sampled = operator.mask.reshape(-1, *kspace.shape[-2:])[0].double()  # type: ignore[union-attr]
    return (kspace * sampled).abs().flatten(1).norm(dim=1)


def test_shipped_model_is_admitted_and_small(spec: ModelSpec) -> None:
    path = KERNEL / "model.safetensors"
    assert 0 < path.stat().st_size < MAX_BYTES
    admission = admit(path, "safetensors", spec)
    assert admission.ok, admission.reason


def test_shipped_audit_config_uses_the_training_operator_and_the_kernel_check() -> None:
    config = AuditConfig.model_validate(json.loads((KERNEL / "audit.json").read_text()))
    reference = json.loads((EXAMPLES / "reference" / "audit.json").read_text())["operator"]
    assert config.operator is not None
    assert config.operator.model_dump(mode="json") == MRIOperator.model_validate(
        reference
    ).model_dump(mode="json")
    kinds = [check.kind for check in config.checks]
    assert "kernel" in kinds


def test_pairs_are_near_kernel_pairs(
    operator: LinearOperator, pairs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, x_other = pairs
    measured = _kspace_distance(operator, x, x_other)
    torch.testing.assert_close(measured, torch.full_like(measured, VISIBLE), atol=1e-4, rtol=0)
    assert bool((_norms(x - x_other) > MIN_DISTANCE).all())
    # the difference is mostly invisible: its measurements are a small part of it
    assert bool((measured < 0.15 * _norms(x - x_other)).all())


def test_theorem_conditions_hold_and_bound_the_lipschitz_constant(
    spec: ModelSpec, operator: LinearOperator, pairs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, x_other = pairs
    model = load_model(KERNEL / "model.safetensors", "safetensors", spec)
    with torch.no_grad():
        recovered = model(operator.A_adjoint(operator.A(torch.cat([x, x_other]))))
    r = _norms(recovered[:PAIRS] - x)
    r_other = _norms(recovered[PAIRS:] - x_other)
    distance = _norms(x - x_other)
    measured = _kspace_distance(operator, x, x_other)
    bounds = []
    for k in range(PAIRS):
        # the smallest η meeting (3) and (4) strictly; the bound (D − 2η)/η falls with η
        eta = max(float(measured[k]), float(r[k] + r_other[k]) / 2 * (1 + 1e-6))
        assert float(measured[k]) <= eta  # (3)
        assert float(r[k] + r_other[k]) < 2 * eta  # (4)
        assert float(distance[k]) > 2 * eta  # (2): the pair certifies
        bounds.append((float(distance[k]) - 2 * eta) / eta)
    assert max(bounds) >= MIN_BEST_BOUND, bounds
    # the proof's witness: e* = Ax' − Ax moves the output by more than the bound times ‖e*‖
    change = _norms(recovered[PAIRS:] - recovered[:PAIRS])
    assert bool((change / measured >= torch.tensor(bounds, dtype=torch.float64)).all())
