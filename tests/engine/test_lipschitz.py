from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import TypeAdapter

from schemas.checks import LipschitzCheck
from schemas.operators import Operator
from tests.engine.tiny_models import Identity, Linear, config, spec
from tests.engine.worst_case_fixtures import DenseOperator, linear_subject, near_isotropic_inverse
from workers.engine.audit import run_audit_with_model
from workers.engine.checks.lipschitz import Lipschitz
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


# ---------------------------------------------------------------- near-equal top singular values


def _dense_lipschitz(
    matrix: torch.Tensor, images: int, seed: int, **check: object
) -> tuple[dict, list[dict]]:
    """The check's run and merge on Ψ(y) = M y over y = A x (A = I: every entry measured)."""
    n = matrix.shape[1]
    side = math.isqrt(n)
    shape = (1, side, side)
    operator = DenseOperator(torch.eye(n), shape)
    x = torch.rand(images, *shape, generator=torch.Generator().manual_seed(seed))
    ctx = SimpleNamespace(
        operator=operator,
        device=torch.device("cpu"),
        measurements=lambda indices: operator.A(x[list(indices)]),
    )
    runner = Lipschitz()
    config = LipschitzCheck(**check)
    shard = runner.run(config, ctx, linear_subject(matrix.float(), shape), range(images), seed)
    return runner.merge(config, [shard]), shard["per_image"]


def _near_a_singular_value(norm: float, accuracy: float, singular: torch.Tensor) -> bool:
    """What the residual proves: a singular value in [σ·√(1 − ρ), σ·√(1 + ρ)], with
    √(1 + ρ) = 1 + accuracy (float32 rounding aside)."""
    rho = (1 + accuracy) ** 2 - 1
    low, high = norm * math.sqrt(max(0.0, 1 - rho)), norm * (1 + accuracy)
    slack = 1e-5 * float(singular.max())
    return bool(((singular >= low - slack) & (singular <= high + slack)).any())


@pytest.mark.parametrize("floor", [None, 0.3], ids=["isotropic", "spread"])
@pytest.mark.parametrize(
    ("gap", "size", "seed", "gain"),
    [(0.01, 8, 0, 2.5), (0.02, 12, 1, 0.7), (0.001, 16, 2, 1.0), (0.01, 16, 3, 40.0)],
)
def test_default_lipschitz_is_exact_on_near_equal_top_singular_values(
    gap: float, size: int, seed: int, gain: float, floor: float | None
) -> None:
    """Ψ = g·B, σ(B) = 1, 1 − gap, … (the rest 1 − gap, or from 1 − gap down to 0.3): σ_max is
    g exactly. With the defaults (50 iterations, tolerance 1e-4) the norm is within 1e-4 of it
    and never above it; the accuracy stated is what the residual proves, and a warning says
    where it is above the tolerance (0.1 % between the top two and 250 more within 70 %:
    Lanczos has not split the top pair in 50 iterations, though its value is already right)."""
    gen = torch.Generator().manual_seed(seed)
    _, b, singular = near_isotropic_inverse(size * size, gap, True, gen, floor)
    result, rows = _dense_lipschitz(gain * b, images=3, seed=seed)
    accuracies = [row["accuracy"] for row in rows]
    assert (result["warnings"] == []) == (max(accuracies) <= 1e-4), (result, accuracies)
    if gap >= 0.01 or floor is None:
        assert result["warnings"] == []
    for row in rows:
        norm, accuracy = row["jacobian_norm"], row["accuracy"]
        assert norm >= gain * (1 - 1e-4), (norm / gain, row)
        assert norm <= gain * (1 + 1e-5)
        assert _near_a_singular_value(norm, accuracy, gain * singular), row


@pytest.mark.parametrize("gap", [0.02, 0.01, 0.001])
def test_an_unreached_tolerance_is_a_warning_with_an_honest_accuracy(gap: float) -> None:
    """Two iterations on a spread spectrum cannot resolve the top: the check says so, and the
    accuracy it states is what the residual proves (a singular value that close)."""
    gen = torch.Generator().manual_seed(7)
    _, b, singular = near_isotropic_inverse(144, gap, True, gen, floor=0.1)
    result, rows = _dense_lipschitz(b, images=2, seed=7, iterations=2)
    assert any("did not reach accuracy 0.0001" in w for w in result["warnings"]), result
    for row in rows:
        assert row["iterations"] == 2 and row["accuracy"] > 1e-4
        assert row["jacobian_norm"] <= 1 + 1e-5
        assert _near_a_singular_value(row["jacobian_norm"], row["accuracy"], singular), row
