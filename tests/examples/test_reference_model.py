"""The shipped reference model (examples/reference): its files load through the engine's loader
with the shipped spec, the safetensors weights and the TorchScript export agree, and the model
still reconstructs fresh phantoms as well as when it was trained. No training here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from schemas.audits import AuditConfig
from schemas.model_spec import ModelFormat, ModelSpec
from schemas.operators import MRIOperator
from workers.engine.ground_truth import random_ellipses
from workers.engine.model_loading import admit, load_model
from workers.engine.operators import build_operator

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "reference"
FILES = {"safetensors": REFERENCE / "model.safetensors", "torchscript": REFERENCE / "model.pt"}
MAX_BYTES = 10 * 1024 * 1024
# Seeds no training chunk (1 000 000 on) nor the shipped audits (0) use.
FRESH_SEED = 4242
# Measured on these 8 fresh phantoms when the weights were shipped: mean 0.048, max 0.060
# (A*y alone: 0.24). A broken export or wrong weights land far above these bounds.
MEAN_ERROR_BOUND = 0.06
MAX_ERROR_BOUND = 0.08


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.model_validate(json.loads((REFERENCE / "spec.json").read_text()))


@pytest.fixture(scope="module")
def operator_and_images(spec: ModelSpec) -> tuple[object, torch.Tensor, torch.Tensor]:
    audit = json.loads((REFERENCE / "audit.json").read_text())
    operator = build_operator(MRIOperator.model_validate(audit["operator"]), spec.image_shape)
    x = random_ellipses(8, spec.image_shape[1], FRESH_SEED)
    return operator, x, operator.A_adjoint(operator.A(x))


def _relative_errors(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)


@pytest.mark.parametrize("fmt", list(FILES))
def test_shipped_files_are_under_10_mb(fmt: str) -> None:
    assert 0 < FILES[fmt].stat().st_size < MAX_BYTES


@pytest.mark.parametrize("fmt", list(FILES))
def test_admission_accepts_the_shipped_files(fmt: ModelFormat, spec: ModelSpec) -> None:
    admission = admit(FILES[fmt], fmt, spec)
    assert admission.ok, admission.reason
    assert 500_000 <= int(admission.info["parameter_count"]) <= 2_000_000  # type: ignore[call-overload]


def test_both_formats_reconstruct_alike_and_well(
    spec: ModelSpec, operator_and_images: tuple[object, torch.Tensor, torch.Tensor]
) -> None:
    _, x, adjoint = operator_and_images
    with torch.no_grad():
        outputs = {fmt: load_model(path, fmt, spec)(adjoint) for fmt, path in FILES.items()}  # type: ignore[arg-type]
    torch.testing.assert_close(outputs["torchscript"], outputs["safetensors"], atol=1e-5, rtol=0)
    errors = _relative_errors(outputs["safetensors"], x)
    zero_filled = _relative_errors(adjoint, x)
    assert float(errors.mean()) < MEAN_ERROR_BOUND, errors
    assert float(errors.max()) < MAX_ERROR_BOUND, errors
    assert float(zero_filled.mean()) > 3 * float(errors.mean())  # the network does the work


def test_shipped_audit_configs_are_valid_and_match_the_training_operator() -> None:
    training_operator = json.loads((REFERENCE / "audit.json").read_text())["operator"]
    for name in ("audit.json", "case-study.json"):
        config = AuditConfig.model_validate(json.loads((REFERENCE / name).read_text()))
        assert config.operator is not None
        assert config.operator.model_dump(mode="json") == MRIOperator.model_validate(
            training_operator
        ).model_dump(mode="json"), name


def test_loss_record_names_how_the_weights_were_trained() -> None:
    record = json.loads((REFERENCE / "loss.json").read_text())
    for key in ("seed", "steps", "batch", "lr", "pool", "mse", "validation_relative_error"):
        assert key in record
    assert len(record["mse"]) == record["steps"] // record["log_every"]
    assert record["validation_relative_error"][-1][1] < record["zero_filled_relative_error"] / 3
