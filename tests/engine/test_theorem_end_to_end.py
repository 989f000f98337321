"""The four theorem checks through the ways a user reaches them: the HTTP request schema, the
engine's API on a TorchScript file, and the local CLI; each lands in report.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from schemas.audits import AuditConfig, AuditRequest
from schemas.model_spec import ModelSpec
from schemas.reports import Report
from service.reports.findings import findings
from workers.cli.main import app
from workers.engine.entry_points import run_audit

SPEC = {
    "name": "blur-net",
    "task": "reconstruction",
    "input": "adjoint",
    "image_shape": [1, 16, 16],
}
CONFIG: dict[str, Any] = {
    "dataset": {"builtin": "ellipses", "count": 2, "size": 16, "seed": 3},
    "operator": {"kind": "mri", "mask": "random_lines", "acceleration": 4, "seed": 1},
    "device": "cpu",
    "checks": [
        {
            "kind": "false_negative",
            "placements": 2,
            "panels": 1,
            "threshold": {"max_miss_rate": 0.5},
        },
        {
            "kind": "false_positive",
            "steps": 3,
            "panels": 1,
            "threshold": {"max_spurious_contrast": 0.9},
        },
        {
            "kind": "kernel",
            "steps": 3,
            "directions": 1,
            "scales": [0.5],
            "panels": 1,
            "threshold": {"max_certified_lipschitz": 1e6},
        },
        {"kind": "more_samples", "accelerations": [8, 4, 2], "threshold": {"max_psnr_drop": 50}},
    ],
}
KINDS = ["false_negative", "false_positive", "kernel", "more_samples"]


class Smooth(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(Smooth()), str(path))
    return path


def _check_report(report: dict[str, Any], out: Path) -> None:
    Report.model_validate(report)
    assert [c["kind"] for c in report["checks"]] == KINDS
    by_kind = {c["kind"]: c for c in report["checks"]}
    assert "miss_rate" in by_kind["false_negative"]
    assert "spurious_contrast" in by_kind["false_positive"]
    assert "best_lower_bound" in by_kind["kernel"] and "hallucination" in by_kind["kernel"]
    assert by_kind["more_samples"]["monotone"] in (True, False)
    for check in report["checks"]:
        for name in check["artifacts"]:
            assert (out / name).is_file()
    assert by_kind["false_positive"]["artifacts"]


def test_the_http_request_accepts_every_theorem_check() -> None:
    request = AuditRequest.model_validate({**CONFIG, "model_id": "m1"})
    assert [c.kind for c in request.checks] == KINDS


def test_engine_api_on_a_torchscript_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run_audit(
        _model_file(tmp_path),
        "torchscript",
        ModelSpec.model_validate(SPEC),
        AuditConfig.model_validate(CONFIG),
        out_dir=out,
        model_sha256="0" * 64,
    )
    _check_report(report, out)
    assert json.loads((out / "report.json").read_text()) == report
    # every check with a threshold reads, in the HTML and JUnit, as measured value against bound
    by_kind = {f.kind: f for f in findings(report)}
    missed = by_kind["false_negative"]
    if missed.result["trials"] == 0:  # no recoverable placement: nothing judged the network
        assert missed.comparisons == [] and missed.verdict == "info"
    else:
        assert missed.comparisons[0].measured == missed.result["miss_rate"]["estimate"]
    assert by_kind["false_positive"].comparisons[0].measured == pytest.approx(
        by_kind["false_positive"].result["spurious_contrast"]["max"]
    )
    assert by_kind["more_samples"].comparisons[0].bound == 50
    kernel = by_kind["kernel"]
    if kernel.result["best_lower_bound"] is None:  # nothing proven: the trivial bound 0
        assert [c.measured for c in kernel.comparisons] == [0.0]
        assert "no certificate" in kernel.sentence
    else:
        assert kernel.comparisons[0].measured == kernel.result["best_lower_bound"]
    for finding in by_kind.values():
        assert "details in report.json" not in finding.sentence
        assert all(c.passed == (finding.verdict == "pass") for c in finding.comparisons)


def test_local_cli(tmp_path: Path) -> None:
    spec_path, config_path = tmp_path / "spec.json", tmp_path / "audit.json"
    spec_path.write_text(json.dumps(SPEC))
    config_path.write_text(json.dumps(CONFIG))
    out = tmp_path / "cli-out"
    result = CliRunner().invoke(
        app,
        [
            "audit",
            "--model",
            str(_model_file(tmp_path)),
            "--spec",
            str(spec_path),
            "--config",
            str(config_path),
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    _check_report(json.loads((out / "report.json").read_text()), out)
