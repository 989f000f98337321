from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter

from schemas.operators import Operator
from tests.engine.tiny_models import Identity, Linear, config, spec
from workers.engine.audit import run_audit_with_model
from workers.engine.operators import build_operator

LIPSCHITZ = {"kind": "lipschitz", "iterations": 300, "tolerance": 1e-9}


def jacobian_norms(model: torch.nn.Module, m: int, tmp_path: Path, **check: object) -> dict:
    cfg = config(
        operator={"kind": "gaussian", "m": m, "seed": 3},
        dataset={"builtin": "ellipses", "count": 2, "size": 8, "seed": 0},
        checks=[{**LIPSCHITZ, **check}],
    )
    report = run_audit_with_model(
        model, spec((1, 8, 8), "measurement"), cfg, out_dir=tmp_path, model_sha256="0" * 64
    )
    return report


def test_linear_model_has_the_largest_singular_value(tmp_path: Path) -> None:
    matrix = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    report = jacobian_norms(Linear(matrix, (1, 8, 8)), 20, tmp_path)
    (result,) = report["checks"]
    expected = float(torch.linalg.svdvals(matrix.double())[0])
    for row in result["per_image"]:
        assert row["jacobian_norm"] == pytest.approx(expected, rel=0.01)
        assert row["iterations"] <= 300
    assert result["jacobian_norm"]["max"] == pytest.approx(expected, rel=0.01)
    # one forward per image; one backward to build Jᵀ·probe plus two per iteration
    assert report["cost"]["forward_passes"] == 2
    assert report["cost"]["backward_passes"] >= 2 * 3


def test_pseudo_inverse_of_gaussian_operator_has_one_over_smallest_singular_value(
    tmp_path: Path,
) -> None:
    operator = build_operator(
        TypeAdapter(Operator).validate_python({"kind": "gaussian", "m": 16, "seed": 3}),
        (1, 8, 8),
    )
    a = operator.physics._A.double()  # [16, 64]
    pinv = torch.linalg.pinv(a).float()
    report = jacobian_norms(Linear(pinv, (1, 8, 8)), 16, tmp_path)
    expected = 1.0 / float(torch.linalg.svdvals(a)[-1])
    assert report["checks"][0]["jacobian_norm"]["max"] == pytest.approx(expected, rel=0.02)


def test_threshold_verdicts(tmp_path: Path) -> None:
    matrix = torch.eye(64, 20) * 3.0  # σ_max = 3
    model = Linear(matrix, (1, 8, 8))
    passing = jacobian_norms(model, 20, tmp_path, threshold={"max_jacobian_norm": 3.1})
    failing = jacobian_norms(model, 20, tmp_path, threshold={"max_jacobian_norm": 2.9})
    assert passing["checks"][0]["verdict"] == "pass"
    assert failing["checks"][0]["verdict"] == "fail"
    assert failing["checks"][0]["jacobian_norm"]["mean"] == pytest.approx(3.0, rel=1e-5)


def test_mri_power_iteration_stays_on_measured_entries(tmp_path: Path) -> None:
    # Ψ = A* (zero-filled): on the sampled k-space entries A* is an isometry, so ‖J‖ = 1.
    cfg = config(
        operator={"kind": "mri", "mask": "variable_density"},
        checks=[{"kind": "lipschitz", "iterations": 20}],
    )
    report = run_audit_with_model(
        Identity(),
        spec((2, 16, 16), "adjoint", complex=True),
        cfg,
        out_dir=tmp_path,
        model_sha256="0" * 64,
    )
    assert report["checks"][0]["jacobian_norm"]["max"] == pytest.approx(1.0, rel=1e-4)


class _NonFiniteGradient(torch.nn.Module):
    """Ψ(y) = sqrt(|By|): its Jacobian is infinite where By = 0."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.linear = Linear(matrix, (1, 8, 8))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear(y * 0).abs().sqrt()


def test_a_non_finite_jacobian_norm_is_null_and_fails_a_threshold(tmp_path: Path) -> None:
    model = _NonFiniteGradient(torch.randn(64, 20, generator=torch.Generator().manual_seed(1)))
    report = jacobian_norms(model, 20, tmp_path, threshold={"max_jacobian_norm": 10.0})
    (result,) = report["checks"]
    assert all(row["jacobian_norm"] is None for row in result["per_image"])
    assert result["verdict"] == "fail"
    assert any("not finite" in w for w in result["warnings"])
    assert (tmp_path / "report.json").is_file()  # the report is still valid JSON


def test_the_empirical_ratio_of_the_other_checks_stands_beside_the_jacobian(
    tmp_path: Path,
) -> None:
    # Ψ(y) = 3·P y on a denoising operator: every ratio ‖Ψ(y+e) − Ψ(y)‖/‖e‖ is exactly 3
    cfg = config(
        operator={"kind": "denoising"},
        dataset={"builtin": "ellipses", "count": 2, "size": 8, "seed": 0},
        checks=[
            {"kind": "random_noise", "levels": [0.01, 0.1], "samples": 2},
            {**LIPSCHITZ, "iterations": 20},
        ],
    )

    class Triple(torch.nn.Module):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return 3.0 * y

    report = run_audit_with_model(
        Triple(), spec((1, 8, 8), "measurement"), cfg, out_dir=tmp_path, model_sha256="0" * 64
    )
    lipschitz = next(c for c in report["checks"] if c["kind"] == "lipschitz")
    assert lipschitz["jacobian_norm"]["max"] == pytest.approx(3.0, rel=1e-5)
    bound = lipschitz["empirical_lower_bound"]
    assert bound["check"] == "random_noise"
    assert bound["value"] == pytest.approx(3.0, rel=1e-5)
