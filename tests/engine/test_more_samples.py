from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from schemas.checks_theorem import MoreSamplesCheck
from tests.engine.tiny_models import Identity, config, spec
from workers.engine.audit import run_audit_with_model
from workers.engine.checks.more_samples import sampling_levels
from workers.shared.errors import EngineInputError

# real images (A embeds x as (x, 0)): PSNR then sees the sign of the reconstruction
SPEC = spec((1, 16, 16), "adjoint")


class Negated(torch.nn.Module):
    """Ψ(A*y) = −A*y = −P x: ‖Ψ − x‖² = ‖x‖² + 2⟨x, P x⟩ + ‖P x‖² grows as the sampled part
    P x = A*A x grows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def _run(tmp_path: Path, model: torch.nn.Module, **check: Any) -> dict[str, Any]:
    cfg = config(
        operator={"kind": "mri", "mask": "cartesian", "center_fraction": 0.1},
        dataset={"builtin": "shepp_logan", "count": 2, "size": 16},
        checks=[{"kind": "more_samples", "accelerations": [8, 4, 2], **check}],
    )
    report = run_audit_with_model(model, SPEC, cfg, out_dir=tmp_path, model_sha256="0" * 64)
    return report["checks"][0]


def test_zero_filling_improves_with_more_samples(tmp_path: Path) -> None:
    check = _run(tmp_path, Identity(), threshold={"max_psnr_drop": 0.0})
    assert check["parameter"] == "acceleration" and check["images"] == 2
    psnr = [row["psnr"]["mean"] for row in check["levels"]]
    assert psnr == sorted(psnr) and psnr[0] < psnr[-1]
    assert check["monotone"] is True and check["falls"] == [] and check["verdict"] == "pass"


def test_quality_that_falls_as_samples_rise_is_flagged(tmp_path: Path) -> None:
    check = _run(tmp_path, Negated(), threshold={"max_psnr_drop": 0.0})
    assert check["monotone"] is False and check["verdict"] == "fail"
    assert check["falls"][0]["psnr_drop"] > 0
    assert any("quality falls while samples rise" in w for w in check["warnings"])


def test_a_fixed_shape_measurement_model_is_skipped_with_a_warning(tmp_path: Path) -> None:
    cfg = config(
        operator={"kind": "radon", "angles": 6},
        checks=[{"kind": "more_samples", "angles": [4, 6, 8]}],
    )
    report = run_audit_with_model(
        Identity(), spec((1, 16, 16), "measurement"), cfg, out_dir=tmp_path, model_sha256="0" * 64
    )
    check = report["checks"][0]
    assert all("skipped" in row for row in check["levels"]) and check["monotone"] is None
    assert len(check["warnings"]) == 4


def test_the_sampling_list_must_match_the_operator() -> None:
    # One rule (schemas.checks_theorem.sampling_operator_problem): the config refuses it, so the
    # gateway answers 422 at submission; the engine applies the same rule.
    with pytest.raises(ValidationError, match="angles apply to the radon operator"):
        config(checks=[{"kind": "more_samples", "angles": [4, 8]}])
    check = MoreSamplesCheck(accelerations=[8.0, 4.0])
    with pytest.raises(EngineInputError, match="accelerations apply to the mri operator"):
        sampling_levels(check, "radon")
    assert sampling_levels(check, "mri") == ("acceleration", [8.0, 4.0])
