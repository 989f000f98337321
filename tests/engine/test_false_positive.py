from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.engine.tiny_models import Identity, config, spec
from workers.engine.audit import run_audit_with_model
from workers.engine.checks.false_positive import flattest_window
from workers.engine.ground_truth import random_ellipses


def test_the_window_goes_where_the_image_is_flat() -> None:
    image = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    image[:, 9:14, 2:7] = 0.5  # the only flat 5×5 patch
    assert flattest_window(image, 5, complex_image=False) == (9, 2)


def test_identity_puts_all_the_perturbation_into_the_window(tmp_path: Path) -> None:
    delta, side = 0.05, 4
    cfg = config(
        checks=[
            {
                "kind": "false_positive",
                "delta": delta,
                "window": side,
                "steps": 80,
                "panels": 1,
                "threshold": {"max_spurious_contrast": 0.01},
            }
        ]
    )
    report = run_audit_with_model(
        Identity(), spec((1, 16, 16), "image"), cfg, out_dir=tmp_path, model_sha256="0" * 64
    )
    (check,) = report["checks"]
    images = random_ellipses(3, 16, 1)
    for row in check["per_image"]:
        # Ψ = I on denoising: the best e lies inside the window with ‖e‖ = δ‖y‖, so the
        # window's RMS change is exactly δ‖x‖ / side (value range [0, 1])
        expected = delta * float(images[row["index"]].norm()) / side
        assert row["window_rms_contrast"] == pytest.approx(expected, rel=1e-3)
        assert row["relative_perturbation"] == pytest.approx(delta, rel=1e-4)
        assert row["spurious_contrast"] >= row["window_rms_contrast"]
    assert check["verdict"] == "fail"
    assert check["artifacts"] == ["c00-model-false_positive-0.png"]
    assert math.isclose(
        check["spurious_contrast"]["max"], max(r["spurious_contrast"] for r in check["per_image"])
    )
