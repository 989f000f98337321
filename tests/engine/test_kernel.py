from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine.tiny_models import Identity, Linear, config, spec
from workers.engine.audit import run_audit_with_model
from workers.engine.checks.kernel import ETA_MARGIN, certify, nearest_neighbours
from workers.engine.ground_truth import random_ellipses

SIDE = 8  # images 8×8: A is a 64×64 matrix
SMALL = 0.01  # the smallest singular value of A


def test_certify_uses_the_smallest_admissible_eta() -> None:
    # ‖Ax − Ax'‖ sets η: bound (‖x − x'‖ − 2η)/η
    c = certify(distance=1.0, measurement_distance=0.1, r=0.02, r_other=0.04, output_distance=0.95)
    assert c is not None and c.eta == 0.1 and c.bound == pytest.approx(8.0)
    # the recovery errors set η: (r + r')/2, made strict by the margin
    c = certify(distance=1.0, measurement_distance=0.01, r=0.1, r_other=0.3, output_distance=0.7)
    assert c is not None and c.eta == pytest.approx(0.2 * (1 + ETA_MARGIN))
    assert c.bound == pytest.approx((1.0 - 2 * c.eta) / c.eta)
    # condition (2) fails: ‖x − x'‖ ≤ 2η
    assert certify(0.2, 0.1, 0.0, 0.0, 0.2) is None
    # identical measurements and perfect recovery of both cannot happen for x ≠ x'
    assert certify(1.0, 0.0, 0.0, 0.0, 0.0) is None
    assert certify(math.nan, 0.1, 0.0, 0.0, 1.0) is None


def test_the_direct_ratio_and_the_best_of_the_two_bounds() -> None:
    # ‖Ψ(Ax') − Ψ(Ax)‖/‖Ax' − Ax‖ = 0.95/0.1 beats the theorem's (1 − 0.2)/0.1
    c = certify(distance=1.0, measurement_distance=0.1, r=0.02, r_other=0.04, output_distance=0.95)
    assert c is not None and c.output_distance == 0.95
    assert c.direct_ratio == pytest.approx(9.5) and c.bound == pytest.approx(8.0)
    assert c.best_lower_bound == c.direct_ratio
    # the recovery errors set η = 0.2: the direct ratio divides by ‖Ax − Ax'‖ = 0.01 instead
    c = certify(distance=1.0, measurement_distance=0.01, r=0.1, r_other=0.3, output_distance=0.7)
    assert c is not None and c.direct_ratio == pytest.approx(70.0)
    assert c.best_lower_bound == pytest.approx(70.0) and c.bound < 4.0
    # Ax = Ax': the ratio is 0/0, reported as None, and the best is the theorem's bound
    c = certify(distance=1.0, measurement_distance=0.0, r=0.1, r_other=0.1, output_distance=0.0)
    assert c is not None and c.direct_ratio is None and c.best_lower_bound == c.bound


def test_nearest_neighbours_match_brute_force() -> None:
    features = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    found = nearest_neighbours(features, 3)
    distances = torch.cdist(features, features)
    distances.fill_diagonal_(math.inf)
    expected = distances.argsort(dim=1)[:, :3]
    assert torch.equal(found.sort(1).values, expected.sort(1).values)


def _matrix_file(tmp_path: Path) -> tuple[torch.Tensor, Path]:
    """A = Q diag(s) Qᵀ with one small singular value along a random direction."""
    generator = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(
        torch.randn(SIDE * SIDE, SIDE * SIDE, generator=generator, dtype=torch.float64)
    )
    s = torch.linspace(1.0, 0.5, SIDE * SIDE, dtype=torch.float64)
    s[-1] = SMALL
    matrix = q @ torch.diag(s) @ q.T
    path = tmp_path / "A.npy"
    np.save(path, matrix.numpy().astype(np.float32))
    return matrix, path


def test_a_model_that_recovers_a_near_kernel_pair_gets_a_proven_and_confirmed_bound(
    tmp_path: Path,
) -> None:
    matrix, path = _matrix_file(tmp_path)
    inverse = torch.linalg.inv(matrix).float()  # Ψ = A⁻¹ recovers every image exactly
    model = Linear(inverse, (1, SIDE, SIDE))
    cfg = config(
        dataset={"builtin": "ellipses", "count": 3, "size": SIDE, "seed": 2},
        operator={"kind": "gaussian", "matrix": {"file": str(path)}},
        checks=[
            {
                "kind": "kernel",
                "directions": 1,
                "scales": [0.5],
                "neighbours": 2,
                "confirm": 1,
                "steps": 30,
                "restarts": 1,
                "panels": 1,
                "threshold": {"max_certified_lipschitz": 50.0},
            }
        ],
    )
    report = run_audit_with_model(
        model,
        spec((1, SIDE, SIDE), "measurement"),
        cfg,
        out_dir=tmp_path / "out",
        model_sha256="0" * 64,
        base_dir=tmp_path,
    )
    (check,) = report["checks"]
    best = check["certificates"][0]
    assert best["source"] == "built" and check["best_lower_bound"] == best["best_lower_bound"]
    assert best["singular_value"] == pytest.approx(SMALL, rel=1e-3)
    assert check["best_lower_bound"] == max(c["best_lower_bound"] for c in check["certificates"])
    assert check["best_theorem_bound"] == max(c["bound"] for c in check["certificates"])
    for c in check["certificates"]:
        assert c["best_lower_bound"] == max(c["bound"], c["direct_ratio"])
        # the triangle inequality and (4): e* = Ax' − Ax moves Ψ by more than bound·‖e*‖
        assert c["direct_ratio"] >= c["bound"] * (1 - 1e-5)

    # the same pair, computed here from the definitions
    x = random_ellipses(3, SIDE, 2)[best["index"]].double().flatten()
    _, vectors = torch.linalg.eigh(matrix)
    v = vectors[:, 0]  # the direction of the smallest singular value (sign does not matter)
    x_other = x + 0.5 * x.norm() * v
    a = lambda image: matrix @ image  # noqa: E731
    psi = lambda y: torch.linalg.solve(matrix, y)  # noqa: E731
    distance = float((x - x_other).norm())
    measured = float((a(x) - a(x_other)).norm())
    r, r_other = float((psi(a(x)) - x).norm()), float((psi(a(x_other)) - x_other).norm())
    eta = max(measured, 0.5 * (r + r_other) * (1 + ETA_MARGIN))
    assert best["eta"] == pytest.approx(eta, rel=1e-4)
    assert best["distance"] == pytest.approx(distance, rel=1e-5)
    assert best["bound"] == pytest.approx((distance - 2 * eta) / eta, rel=1e-4)
    assert best["bound"] == pytest.approx(1 / SMALL - 2, rel=1e-3)  # A⁻¹ is 1/σ-Lipschitz
    # the direct ratio at e* = Ax' − Ax, from the definitions: for Ψ = A⁻¹ and x' − x along the
    # smallest singular direction it is the Lipschitz constant 1/σ itself, above the theorem's
    moved = float((psi(a(x_other)) - psi(a(x))).norm())
    assert best["output_distance"] == pytest.approx(moved, rel=1e-4)
    assert best["direct_ratio"] == pytest.approx(moved / measured, rel=1e-4)
    assert best["direct_ratio"] == pytest.approx(1 / SMALL, rel=1e-3)
    assert best["best_lower_bound"] == best["direct_ratio"] > best["bound"]
    # the worst-case search at radius η reaches the theorem's bound (a test of the search)
    assert best["search_reached_bound"] is True and best["confirmed"] is True, (
        best["empirical_lipschitz"],
        best["bound"],
        best["search_radius"],
        best["eta"],
    )
    assert best["empirical_lipschitz"] >= best["bound"]
    assert check["confirmation"] == {"checked": 1, "search_reached_bound": 1, "confirmed": 1}
    assert check["verdict"] == "fail" and report["verdict"] == "fail"
    assert "c00-model-kernel-certificate-0.png" in check["artifacts"]
    pair = np.load(tmp_path / "out" / "c00-model-kernel-certificate-0-pair.npy")
    assert pair.shape == (2, 1, SIDE, SIDE)


def test_the_identity_on_denoising_has_no_certificate_and_no_hallucination(tmp_path: Path) -> None:
    cfg = config(
        checks=[{"kind": "kernel", "steps": 5, "threshold": {"max_certified_lipschitz": 2.0}}]
    )
    report = run_audit_with_model(
        Identity(), spec((1, 16, 16), "image"), cfg, out_dir=tmp_path, model_sha256="0" * 64
    )
    (check,) = report["checks"]
    assert check["certificate_count"] == 0 and check["best_lower_bound"] is None
    assert check["verdict"] == "pass"
    assert check["hallucination"]["returns"]["either"] == 3  # A = I: nothing is invisible


def test_hallucination_rows_on_inpainting(tmp_path: Path) -> None:
    cfg = config(
        operator={"kind": "inpainting", "fraction": 0.5},
        checks=[{"kind": "kernel", "directions": 0, "neighbours": 0, "panels": 1}],
    )
    report = run_audit_with_model(
        Identity(), spec((1, 16, 16), "image"), cfg, out_dir=tmp_path, model_sha256="0" * 64
    )
    hallucination = report["checks"][0]["hallucination"]
    assert hallucination["method"] == "projection"
    for row in hallucination["per_image"]:
        assert row["null_residual"] == 0.0 and 0 < row["null_fraction"] < 1
        nearer = "x" if row["error_to_x"] <= row["error_to_x_plus_z"] else "x+z"
        assert row["returns"] == nearer
    assert "c00-model-kernel-hallucination-0.png" in report["checks"][0]["artifacts"]
