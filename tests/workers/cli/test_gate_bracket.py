"""`tightrope gate` on a worst_case check with `certify` (docs/theorem.md, "Brackets"): exit 0
when the certified bound proves the threshold (check verdict `proven`, audit `pass`); with a
threshold between the found value and the certified one, exit 1 under `unproven: "fail"` and 0
under `unproven: "pass"`."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.fixtures import model_factory
from workers.cli.main import app

runner = CliRunner()
SIZE = 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small DnCNN (convolutions and ReLUs: every layer bounded) as .safetensors weights."""
    root = tmp_path_factory.mktemp("gate-bracket")
    model_factory.dncnn_safetensors(root / "model.safetensors")
    spec = model_factory.registered_spec("dncnn", size=SIZE)
    (root / "spec.json").write_text(json.dumps(spec))
    return root


def _gate(inputs: Path, tmp_path: Path, name: str, bound: float, policy: str) -> tuple[Any, Path]:
    check = {
        "kind": "worst_case",
        "levels": [0.05],
        "steps": 20,
        "restarts": 2,
        "threshold": {"max_lipschitz": bound},
        "certify": {"unproven": policy},
    }
    config = {
        "dataset": {"builtin": "shepp_logan", "count": 1, "size": SIZE},
        "operator": {"kind": "denoising"},
        "checks": [check],
        "device": "cpu",
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    out = tmp_path / name
    argv = ["gate", "--model", str(inputs / "model.safetensors"), "--spec"]
    argv += [str(inputs / "spec.json"), "--config", str(path), "--out", str(out), "--quiet"]
    return runner.invoke(app, argv), out


def _result(out: Path) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    (result,) = report["checks"]
    return {**result, "audit_verdict": report["verdict"]}


def test_gate_exit_codes_for_proven_and_unproven(inputs: Path, tmp_path: Path) -> None:
    proven, out = _gate(inputs, tmp_path, "proven", 1e6, "fail")
    assert proven.exit_code == 0, proven.output
    result = _result(out)
    assert result["verdict"] == "proven" and result["audit_verdict"] == "pass"
    assert "proof: proven" in proven.output
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("failures") == "0"
    bracket = result["levels"][0]["certified"]
    found, upper = bracket["found"], bracket["upper"]
    assert 0 < found < upper / 1.01  # a gap the bound leaves open
    between = math.sqrt(found * upper)

    unproven, out = _gate(inputs, tmp_path, "unproven-fail", between, "fail")
    assert unproven.exit_code == 1, unproven.output
    result = _result(out)
    assert result["certify"]["proof"] == "unproven" and result["verdict"] == "fail"
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("failures") == "1"
    (failure,) = suite.iter("failure")
    assert "certified upper bound" in failure.get("message", "")

    accepted, out = _gate(inputs, tmp_path, "unproven-pass", between, "pass")
    assert accepted.exit_code == 0, accepted.output
    result = _result(out)
    assert result["certify"]["proof"] == "unproven" and result["verdict"] == "pass"
