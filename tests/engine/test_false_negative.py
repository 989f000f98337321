from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from schemas.operators import GaussianOperator
from tests.engine.tiny_models import Identity, config, spec
from workers.engine.audit import run_audit_with_model
from workers.engine.checks.false_negative import (
    RECOVERY_TOLERANCE,
    is_recovered,
    recovery,
    visible_fraction,
)
from workers.engine.nullspace import row_space_projector
from workers.engine.operators import build_operator


class LowPass(torch.nn.Module):
    """A strongly low-pass 'reconstruction': a 5×5 box average."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)


def _check(tmp_path: Path, model: torch.nn.Module, **fields: Any) -> dict[str, Any]:
    check = {
        "kind": "false_negative",
        "lesion": {"shape": "disk", "size": 1, "contrast": 0.05},
        "placements": 4,
        "noise_samples": 3,
        "steps": 4,
        "panels": 1,
        "threshold": {"max_miss_rate": 0.5},
        **fields,
    }
    cfg = config(checks=[check], dataset={"builtin": "ellipses", "count": 2, "size": 16, "seed": 1})
    report = run_audit_with_model(
        model, spec((1, 16, 16), "image"), cfg, out_dir=tmp_path, model_sha256="0" * 64
    )
    return report["checks"][0]


def test_recovery_is_exact_for_known_reconstructions() -> None:
    z = torch.zeros(1, 1, 4, 4)
    z[..., 1, 2] = 0.3
    base = torch.rand(1, 1, 4, 4)
    assert float(recovery(base + z, base, z)[0]) == pytest.approx(1.0)
    assert float(recovery(base, base, z)[0]) == 0.0
    assert float(recovery(base + 0.25 * z, base, z)[0]) == pytest.approx(0.25)


@pytest.mark.parametrize("search", ["random", "noise", "adversarial"])
def test_identity_on_denoising_misses_no_lesion(tmp_path: Path, search: str) -> None:
    check = _check(tmp_path, Identity(), search=search, measurement_delta=0.01)
    assert check["misses"] == 0 and check["verdict"] == "pass"
    assert check["recovery"]["min"] == pytest.approx(1.0, abs=1e-4)
    assert check["artifacts"] == []  # panels show misses only


@pytest.mark.parametrize("search", ["random", "noise", "adversarial"])
def test_a_low_pass_model_misses_small_low_contrast_lesions(tmp_path: Path, search: str) -> None:
    check = _check(tmp_path, LowPass(), search=search)
    assert check["verdict"] == "fail"
    assert check["miss_rate"]["estimate"] == 1.0
    # a 5-pixel disk under a 25-pixel average keeps at most 5/25 of its contrast
    assert check["recovery"]["mean"] <= 0.2 + 1e-5
    trials = 2 * 4 * (3 if search == "noise" else 1)
    assert check["trials"] == trials and check["miss_rate"]["ci_high"] == 1.0
    assert check["artifacts"] == ["c00-model-false_negative-0.png"]
    row = check["per_placement"][0]
    assert {"index", "row", "col", "misses", "trials"} <= set(row)


def test_adversarial_search_never_does_better_than_the_full_lesion(tmp_path: Path) -> None:
    random = _check(tmp_path / "r", LowPass(), search="random", placements=2)
    adversarial = _check(tmp_path / "a", LowPass(), search="adversarial", placements=2)
    for r, a in zip(random["per_placement"], adversarial["per_placement"], strict=True):
        assert (r["row"], r["col"]) == (a["row"], a["col"])
        assert a["recovery"] <= r["recovery"] + 1e-6


def test_text_lesion_and_explicit_positions(tmp_path: Path) -> None:
    check = _check(
        tmp_path,
        Identity(),
        lesion={"shape": "text", "size": 6, "contrast": -0.2, "text": "T"},
        positions=[{"row": 5, "col": 5}],
    )
    assert check["placements"] == 2 and check["per_placement"][0]["row"] == 5
    assert check["verdict"] == "pass"


# --- recoverability: a lesion counts against the network only where the data carries it ---


class Scaled(torch.nn.Module):
    """Ψ = factor · A⁺ with input 'adjoint' under inpainting: recovers factor × the visible
    share of every lesion."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


def _inpainting_check(
    tmp_path: Path, model: torch.nn.Module, mask: np.ndarray | None, **fields: Any
) -> dict[str, Any]:
    """One false_negative result under inpainting: the mask file `mask` (1: measured) or, with
    None, a seeded random half of the pixels. The model's input is A*y, so Identity is A⁺."""
    check = {
        "kind": "false_negative",
        "lesion": {"shape": "square", "size": 3, "contrast": 0.2},
        "placements": 8,
        "noise_samples": 2,
        "steps": 4,
        "panels": 0,
        **fields,
    }
    operator: dict[str, Any] = {"kind": "inpainting", "fraction": 0.5, "seed": 3}
    if mask is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "mask.npy", mask.astype(np.float32))
        operator = {"kind": "inpainting", "mask": {"file": "mask.npy"}}
    cfg = config(
        checks=[check],
        operator=operator,
        dataset={"builtin": "ellipses", "count": 2, "size": 16, "seed": 1},
    )
    report = run_audit_with_model(
        model,
        spec((1, 16, 16), "adjoint"),
        cfg,
        out_dir=tmp_path / "out",
        model_sha256="0" * 64,
        base_dir=tmp_path,
    )
    return report["checks"][0]


def _half_mask() -> np.ndarray:
    """Columns 0–7 measured, 8–15 not."""
    mask = np.zeros((16, 16))
    mask[:, :8] = 1.0
    return mask


@pytest.mark.parametrize(
    ("search", "fields"),
    [
        ("random", {}),
        ("adversarial", {}),
        # the verdict compares the upper 95 % bound: 0 misses need ≥ 72 trials to bound 5 %
        ("noise", {"noise_samples": 40}),
    ],
)
def test_zero_filling_under_inpainting_misses_nothing_the_data_carries(
    tmp_path: Path, search: str, fields: dict[str, Any]
) -> None:
    check = _inpainting_check(
        tmp_path, Identity(), None, search=search, threshold={"max_miss_rate": 0.05}, **fields
    )
    assert check["verdict"] == "pass" and check["misses"] == 0
    assert check["reference_method"] == "projection"
    rows = check["per_placement"]
    # A⁺ returns exactly the visible share of each lesion: its relative recovery is 1, and
    # every placement whose lesion has a measured pixel (a ninth of it at least) is judged
    unrecoverable = [row for row in rows if not row["recoverable"]]
    assert check["unrecoverable"] == {
        "count": len(unrecoverable),
        "fraction": len(unrecoverable) / len(rows),
    }
    samples = 40 if search == "noise" else 1
    assert check["trials"] == (len(rows) - len(unrecoverable)) * samples > 0
    assert any(row["visible_fraction"] < 0.5 for row in rows if row["recoverable"])
    for row in rows:
        rho = row["recovery_mean"] if search == "noise" else row["recovery"]
        assert rho == pytest.approx(row["visible_fraction"], abs=1e-5)
        assert row["recoverable"] == (row["visible_fraction"] >= 0.1)
        assert row["trials"] == (samples if row["recoverable"] else 0)
        relative = row["relative_recovery_mean" if search == "noise" else "relative_recovery"]
        assert relative == pytest.approx(1.0, abs=1e-5)
    assert check["relative_recovery"]["min"] == pytest.approx(1.0, abs=1e-5)


def test_a_blur_after_zero_filling_still_misses(tmp_path: Path) -> None:
    zero_filling = _inpainting_check(tmp_path / "a", Identity(), None)
    blurred = _inpainting_check(tmp_path / "b", LowPass(), None, threshold={"max_miss_rate": 0.05})
    assert blurred["verdict"] == "fail"
    # the same placements are recoverable: that depends on A and the lesion only
    assert blurred["unrecoverable"] == zero_filling["unrecoverable"]
    assert blurred["trials"] > 0 and blurred["misses"] == blurred["trials"]
    assert blurred["miss_rate"]["estimate"] == 1.0
    # the 5×5 average returns at most k/25 of a 3×3 square with k measured pixels, whose
    # visible share is k/9: at most 9/25 of what A⁺ returns
    assert blurred["relative_recovery"]["mean"] <= 9 / 25 + 1e-5


@pytest.mark.parametrize("search", ["random", "noise", "adversarial"])
def test_visible_fraction_is_the_measured_share_of_the_lesion_energy(
    tmp_path: Path, search: str
) -> None:
    mask = (np.random.default_rng(7).random((16, 16)) < 0.6).astype(np.float64)
    mask[9:14, 9:14] = 0.0  # a block the data does not see
    corners = [(1, 1), (2, 6), (5, 3), (6, 10), (10, 10)]
    check = _inpainting_check(
        tmp_path,
        LowPass(),
        mask,
        search=search,
        positions=[{"row": r, "col": c} for r, c in corners],
    )
    rows = [row for row in check["per_placement"] if row["index"] == 0]
    assert [(row["row"], row["col"]) for row in rows] == corners
    # a lesion wholly in the unmeasured block: A⁺A z = 0 exactly, whatever the search did
    inside = rows[-1]
    assert inside["visible_fraction"] == 0.0
    assert not inside["recoverable"] and inside["trials"] == 0 and inside["misses"] == 0
    if search == "adversarial":
        return  # the search reweights the lesion's pixels: its share is no longer the count's
    for row, (r, c) in zip(rows, corners, strict=True):
        # a square of equal pixels: the measured share of its energy is that of its pixels
        share = mask[r : r + 3, c : c + 3].sum() / 9.0
        assert row["visible_fraction"] == pytest.approx(share, rel=1e-12, abs=0.0)
        assert row["recoverable"] == (share >= 0.1)


def test_adversarial_search_records_the_lesion_it_ended_with(tmp_path: Path) -> None:
    check = _inpainting_check(tmp_path, LowPass(), None, search="adversarial", steps=6)
    random = _inpainting_check(tmp_path / "r", LowPass(), None)
    amplitude = 0.2  # contrast × (hi − lo) with the default range [0, 1]
    for a, r in zip(check["per_placement"], random["per_placement"], strict=True):
        assert amplitude / 4 - 1e-6 <= a["lesion_amplitude"] <= amplitude + 1e-6
        # 9 pixels, each in [¼, 1] × amplitude, with the recorded mean
        assert a["lesion_norm"] >= 3.0 * abs(a["lesion_amplitude"]) - 1e-6
        assert a["lesion_norm"] <= 3.0 * amplitude + 1e-6
        # a lesion the data carries is never traded for one it hides, and the search keeps
        # the lowest share of what A⁺ recovers it saw (the full lesion is its first)
        if r["recoverable"]:
            assert a["recoverable"]
            assert a["relative_recovery"] <= r["relative_recovery"] + 1e-6
    assert any(a["lesion_amplitude"] < amplitude - 1e-3 for a in check["per_placement"])


def test_ties_at_the_threshold_are_decided_by_the_tolerance(tmp_path: Path) -> None:
    assert is_recovered(0.5 - 0.5 * RECOVERY_TOLERANCE, 0.5)
    assert not is_recovered(0.5 - 2 * RECOVERY_TOLERANCE, 0.5)
    assert not is_recovered(math.nan, 0.5)
    # a 2×2 square across the mask's edge: exactly half its energy is measured
    position = [{"row": 6, "col": 7}]
    fields = {"positions": position, "lesion": {"shape": "square", "size": 2, "contrast": 0.5}}
    found = {}
    # the default relative threshold 0.8: the bar is ρ = 0.8·0.5 = 0.4
    for factor in (0.8, 0.8 - 1e-5, 0.8 - 4e-5):
        check = _inpainting_check(tmp_path / str(factor), Scaled(factor), _half_mask(), **fields)
        assert all(row["visible_fraction"] == 0.5 for row in check["per_placement"])
        assert check["trials"] == 2
        found[factor] = check["misses"]
    # ρ = 0.5·factor: 0.4 and 0.4 − 5e-6 are ties, 0.4 − 2e-5 is below
    assert found == {0.8: 0, 0.8 - 1e-5: 0, 0.8 - 4e-5: 2}


@pytest.mark.parametrize("threshold", [None, {"max_miss_rate": 0.05}])
def test_no_recoverable_placement_is_said_and_judges_nothing(
    tmp_path: Path, threshold: dict[str, float] | None
) -> None:
    check = _inpainting_check(
        tmp_path, LowPass(), _half_mask(), positions=[{"row": 4, "col": 10}], threshold=threshold
    )
    assert check["unrecoverable"] == {"count": 2, "fraction": 1.0}
    assert check["trials"] == 0 and check["misses"] == 0
    assert check["miss_rate"] == {"estimate": None, "ci_low": None, "ci_high": None}
    assert check["verdict"] == "info"
    assert any("no placement is recoverable" in w for w in check["warnings"])


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_visible_fraction_of_a_general_operator_is_the_row_space_share(
    tmp_path: Path, method: str
) -> None:
    # A: a seeded 24 × 64 matrix (row space of dimension 24); the share ‖Pz‖²/‖z‖² computed
    # here independently from numpy's pseudo-inverse
    matrix = np.random.default_rng(5).standard_normal((24, 64))
    np.save(tmp_path / "a.npy", matrix.astype(np.float32))
    operator = build_operator(
        GaussianOperator(kind="gaussian", matrix={"file": "a.npy"}),
        (1, 8, 8),
        "cpu",
        tmp_path,
    )
    z = torch.zeros(3, 1, 8, 8)
    z[0, 0, 2:5, 2:5] = 0.2
    z[1, 0, 0, :] = -0.3
    z[2, 0, 6, 6] = 0.1
    flat = z.flatten(1).double().numpy()
    a = matrix.astype(np.float32).astype(np.float64)
    projected = flat @ (np.linalg.pinv(a) @ a).T
    share = (projected * flat).sum(1) / (flat * flat).sum(1)
    found = visible_fraction(row_space_projector(operator, torch.device("cpu"), method), z)
    assert found.tolist() == pytest.approx(share.tolist(), abs=1e-5)
    assert all(0.0 < s < 1.0 for s in share)
