"""`tightrope gate --compare-with MODEL_FILE` in process: a model compared with itself passes
(exit 0, one JUnit case per compared figure); an amplified copy regresses (exit 1)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from tests.fixtures import model_factory
from tests.workers.cli.test_gate import _config, _gate


class Amplified(torch.nn.Module):
    """The tiny CNN with its output tripled: three times its Jacobian norm."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = model_factory.build_tiny_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * self.inner(x)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gate-compare")
    model_factory.tiny_cnn_torchscript(root / "model.pt")
    model_factory.tiny_cnn_torchscript(root / "released.pt")
    model_factory._script_and_save(Amplified(), root / "amplified.pt")
    (root / "spec.json").write_text(json.dumps(model_factory.tiny_cnn_spec()))
    return root


def test_gate_compare_with_itself_passes_and_lists_the_figures(
    inputs: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, 1e6)
    result = _gate(inputs, config, tmp_path / "same", "--compare-with", str(inputs / "released.pt"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "same" / "report.json").read_text())
    (check,) = report["comparison"]["checks"]
    assert [f["difference"] for f in check["figures"]] == [0.0]
    assert report["verdict"] == "pass"
    suite = ET.parse(tmp_path / "same" / "junit.xml").getroot()
    names = [case.get("name") for case in suite.iter("testcase")]
    assert names == [
        "c00 lipschitz (model)",
        "c00 lipschitz (reference)",
        "c00 lipschitz regression: largest Jacobian spectral norm",
    ]
    assert suite.get("failures") == "0" and suite.get("skipped") == "1"
    assert "reference" in (tmp_path / "same" / "report.html").read_text()


def test_gate_fails_on_a_regression(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "worse"
    result = runner_gate_amplified(inputs, tmp_path, out)
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    (figure,) = report["comparison"]["checks"][0]["figures"]
    assert figure["regression"] == pytest.approx(2.0, rel=1e-3) and not figure["passed"]
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("failures") == "1"
    failed = [case for case in suite.iter("testcase") if case.find("failure") is not None]
    assert [case.find("failure").get("type") for case in failed] == ["regression"]  # type: ignore[union-attr]


def runner_gate_amplified(inputs: Path, tmp_path: Path, out: Path):  # type: ignore[no-untyped-def]
    from tests.workers.cli.test_gate import runner
    from workers.cli.main import app

    return runner.invoke(
        app,
        [
            "gate",
            "--model",
            str(inputs / "amplified.pt"),
            "--spec",
            str(inputs / "spec.json"),
            "--config",
            str(_config(tmp_path, 1e6)),
            "--out",
            str(out),
            "--quiet",
            "--compare-with",
            str(inputs / "released.pt"),
        ],
    )


def test_a_model_id_needs_a_server(inputs: Path, tmp_path: Path) -> None:
    result = _gate(inputs, _config(tmp_path, 1e6), tmp_path / "id", "--compare-with", "mdl_x")
    assert result.exit_code == 2
    assert "needs --server" in result.output
