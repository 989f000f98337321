from __future__ import annotations

from pathlib import Path

import pytest
import torch

from schemas.operators import InpaintingOperator
from tests.engine.tiny_models import GainAlong, Identity, config, spec
from workers.engine.audit import run_audit_with_model
from workers.engine.context import AuditContext
from workers.engine.ground_truth import load_images
from workers.engine.noise import unit_noise
from workers.engine.operators import build_operator
from workers.engine.stats import clopper_pearson


def audit(model: torch.nn.Module, model_spec, cfg, tmp_path: Path) -> dict:
    return run_audit_with_model(model, model_spec, cfg, out_dir=tmp_path, model_sha256="0" * 64)


@pytest.mark.parametrize("mask", ["cartesian", "radial"])
def test_zero_filled_mri_has_amplification_one(mask: str, tmp_path: Path) -> None:
    # Ψ = A*: Ψ(y+e) − Ψ(y) = A*e and ‖A*e‖ = ‖e‖ for e on the mask (F is unitary), while
    # ‖Ψ(y)‖ = ‖A*y‖ = ‖y‖; so (‖A*e‖/‖A*y‖)/(‖e‖/‖y‖) = 1 exactly, at every level.
    cfg = config(
        operator={"kind": "mri", "mask": mask},
        noise_level=0.02,
        checks=[{"kind": "random_noise", "levels": [0.01, 0.1, 1.0], "samples": 5}],
    )
    report = audit(Identity(), spec((2, 16, 16), "adjoint", complex=True), cfg, tmp_path)
    (result,) = report["checks"]
    assert [row["level"] for row in result["levels"]] == [0.01, 0.1, 1.0]
    for row in result["levels"]:
        assert row["amplification"]["mean"] == pytest.approx(1.0, abs=1e-4)
        assert row["amplification"]["max"] == pytest.approx(1.0, abs=1e-4)
        assert row["trials"] == 15


def test_failure_probability_when_the_error_is_exactly_the_level(tmp_path: Path) -> None:
    # Denoising with Ψ(y) = y and clean y = x: the relative error is ‖e‖/‖x‖ = δ for every
    # sample, so with τ = 0.2 every sample fails at δ = 0.3 and none at δ = 0.1.
    cfg = config(
        checks=[{"kind": "random_noise", "levels": [0.1, 0.3], "samples": 4, "failure_error": 0.2}]
    )
    report = audit(Identity(), spec((1, 16, 16), "image"), cfg, tmp_path)
    low_level, high_level = report["checks"][0]["levels"]
    assert low_level["relative_error"]["mean"] == pytest.approx(0.1, rel=1e-5)
    assert low_level["relative_error"]["std"] == pytest.approx(0.0, abs=1e-5)
    assert high_level["relative_error"]["max"] == pytest.approx(0.3, rel=1e-5)
    assert low_level["failure_probability"] == {
        "estimate": 0.0,
        "ci_low": 0.0,
        "ci_high": pytest.approx(clopper_pearson(0, 12)[1]),
    }
    assert high_level["failures"] == high_level["trials"] == 12
    assert high_level["failure_probability"]["estimate"] == 1.0
    assert high_level["failure_probability"]["ci_low"] == pytest.approx(0.025 ** (1 / 12))
    # Lipschitz ratio of the identity is exactly 1
    assert low_level["lipschitz_lower_bound"]["max"] == pytest.approx(1.0, rel=1e-5)
    assert report["checks"][0]["verdict"] == "info"
    # the report says what was drawn and what the interval is about
    assert "uniform on the sphere of radius δ‖y‖" in report["checks"][0]["distribution"]
    assert "not for a population" in report["checks"][0]["interval_scope"]


def test_the_noise_is_uniform_on_the_sphere_over_the_measured_entries() -> None:
    """What `distribution` says: ‖e‖ = δ‖y‖ exactly, nothing off the mask, and on the n measured
    entries the direction u = e/‖e‖ has the moments of the uniform law on the sphere:
    E[u_i²] = 1/n and E[u_i⁴] = 3/(n(n + 2)) (a normalised uniform-in-a-cube draw, say, would
    give 1.8/(n(n + 2)) for the latter)."""
    operator = build_operator(InpaintingOperator(fraction=0.5, seed=3), (1, 16, 16))
    ctx = AuditContext(operator, torch.zeros(1, 1, 16, 16), torch.device("cpu"), 0, 0.0)
    samples, level = 400, 0.05
    y_norm = torch.full((samples,), 2.0)
    e = unit_noise(ctx, operator.measurement_shape, range(samples), y_norm, level)
    assert torch.allclose(operator.norm(e), torch.full((samples,), level * 2.0), rtol=1e-5)
    assert torch.equal(operator.project(e), e)
    measured = operator.mask.expand(1, 16, 16).flatten().bool()  # type: ignore[union-attr]
    n = int(measured.sum())
    assert n == 128
    u = (e.flatten(1) / e.flatten(1).norm(dim=1, keepdim=True))[:, measured].double()
    assert float((u**2).mean()) == pytest.approx(1 / n, rel=1e-6)  # exact: ‖u‖ = 1
    assert float((u**4).mean()) * n * (n + 2) / 3 == pytest.approx(1.0, abs=0.06)
    assert abs(float(u.mean())) < 3 / (n * samples) ** 0.5


def _threshold_check(level: float) -> dict:
    return {
        "kind": "random_noise",
        "levels": [level],
        "samples": 8,
        "failure_error": 0.2,
        "threshold": {"max_failure_probability": 0.5},
    }


def test_stable_model_meeting_its_threshold_passes(tmp_path: Path) -> None:
    cfg = config(checks=[_threshold_check(0.1)])
    report = audit(Identity(), spec((1, 16, 16), "image"), cfg, tmp_path)
    assert report["checks"][0]["verdict"] == "pass"
    assert report["verdict"] == "pass"


def test_unstable_model_fails(tmp_path: Path) -> None:
    cfg = config(checks=[_threshold_check(0.1)])
    # a huge gain along a direction orthogonal to every image: exact on clean data, and
    # noise along that direction is blown up by 1000
    images = load_images(cfg.dataset).flatten(1)
    direction = torch.ones(256)
    direction[::2] = -1.0
    basis, _ = torch.linalg.qr(images.T.double())
    direction = (direction.double() - basis @ (basis.T @ direction.double())).float()
    model = GainAlong(direction.view(1, 16, 16), gain=1000.0)
    report = audit(model, spec((1, 16, 16), "image"), cfg, tmp_path)
    (result,) = report["checks"]
    assert result["clean_relative_error"]["max"] < 1e-4
    assert result["levels"][0]["failure_probability"]["ci_high"] > 0.5
    assert result["verdict"] == "fail" and report["verdict"] == "fail"
