from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.tiny_models import Identity, config, spec
from workers.engine.audit import run_audit_with_model
from workers.engine.checks.false_negative import recovery


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
