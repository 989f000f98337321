"""`tightrope gate --compare-with` against a real stack: the previous version given as a file
(uploaded, or reused when the service has it) or as the id of a model on the service; a
regression exits 1 with a JUnit failure of type `regression`, the same model exits 0."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from tests.integration.conftest import MODEL_SPEC, SIZE, create_key
from workers.cli.main import app

pytestmark = pytest.mark.integration


class Tripled(torch.nn.Module):
    """The released model with its output tripled: a retraining gone wrong."""

    def __init__(self, released: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.released = released

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * self.released(x)


def test_gate_compares_with_a_file_or_a_model_id_on_the_service(
    make_stack, model_file: Path, tmp_path: Path
) -> None:
    stack = make_stack(f"sqlite:///{tmp_path / 'db.sqlite'}")
    key = create_key(stack)
    candidate = tmp_path / "candidate.pt"
    torch.jit.save(torch.jit.script(Tripled(torch.jit.load(str(model_file)))), str(candidate))
    (tmp_path / "spec.json").write_text(json.dumps(MODEL_SPEC))
    config = {
        "dataset": {"builtin": "ellipses", "count": 1, "size": SIZE, "seed": 1},
        "operator": {"kind": "mri", "acceleration": 4, "center_fraction": 0.1, "seed": 0},
        "checks": [{"kind": "lipschitz", "iterations": 3}],  # tripled: a 3x larger norm
        "device": "cpu",
    }
    (tmp_path / "audit.json").write_text(json.dumps(config))
    common = ["--spec", str(tmp_path / "spec.json"), "--config", str(tmp_path / "audit.json")]
    common += ["--server", stack.api_url, "--key", key]

    worse = CliRunner().invoke(
        app,
        ["gate", "--model", str(candidate), "--compare-with", str(model_file), *common]
        + ["--out", str(tmp_path / "worse")],
    )
    assert worse.exit_code == 1, worse.output
    report = json.loads((tmp_path / "worse" / "report.json").read_text())
    assert report["comparison"]["verdict"] == "fail" and report["verdict"] == "fail"
    # both models ran the audit's check on the same images, and the report compares them
    assert {check["subject"] for check in report["checks"]} == {"model", "reference"}
    (compared,) = report["comparison"]["checks"]
    assert compared["kind"] == "lipschitz" and compared["figures"]
    for figure in compared["figures"]:
        assert figure["difference"] == pytest.approx(figure["model"] - figure["reference"])
        assert figure["model"] > 2 * figure["reference"] > 0  # tripled output, same draws
    suite = ET.parse(tmp_path / "worse" / "junit.xml").getroot()
    failures = [f.get("type") for f in suite.iter("failure")]
    assert "regression" in failures

    # the released model is on the service now: name it by id, compare the model with itself
    sha256 = hashlib.sha256(model_file.read_bytes()).hexdigest()
    listed = httpx.get(
        f"{stack.api_url}/v1/models",
        params={"sha256": sha256},
        headers={"Authorization": f"Bearer {key}"},
    ).json()["items"]
    released_id = listed[0]["id"]
    same = CliRunner().invoke(
        app,
        ["gate", "--model", str(model_file), "--compare-with", released_id, *common]
        + ["--out", str(tmp_path / "same")],
    )
    assert same.exit_code == 0, same.output
    report = json.loads((tmp_path / "same" / "report.json").read_text())
    assert report["comparison"]["reference"]["id"] == released_id
    figures = report["comparison"]["checks"][0]["figures"]
    assert figures and all(figure["difference"] == 0.0 for figure in figures)
