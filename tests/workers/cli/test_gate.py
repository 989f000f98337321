"""`tightrope gate` in process (exit 0 pass, 1 fail, 2 error; report.json, report.html,
junit.xml), `tightrope audit --sign-key`, and `tightrope verify` (0 valid, 1 changed)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.fixtures import model_factory
from workers.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gate")
    model_factory.tiny_cnn_torchscript(root / "model.pt")
    (root / "spec.json").write_text(json.dumps(model_factory.tiny_cnn_spec(name="<b>tiny</b>")))
    return root


def _config(root: Path, bound: float | None, name: str = "audit.json") -> Path:
    check: dict[str, Any] = {"kind": "lipschitz", "iterations": 3}
    if bound is not None:
        check["threshold"] = {"max_jacobian_norm": bound}
    config = {
        "dataset": {"builtin": "shepp_logan", "count": 1, "size": 16},
        "operator": {"kind": "mri", "mask": "cartesian", "acceleration": 4.0},
        "checks": [check],
        "device": "cpu",
    }
    path = root / name
    path.write_text(json.dumps(config))
    return path


def _gate(inputs: Path, config: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(
        app,
        [
            "gate",
            "--model",
            str(inputs / "model.pt"),
            "--spec",
            str(inputs / "spec.json"),
            "--config",
            str(config),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ],
    )


def test_gate_exit_codes_and_outputs(inputs: Path, tmp_path: Path) -> None:
    passing = _gate(inputs, _config(tmp_path, 1e6, "pass.json"), tmp_path / "pass")
    assert passing.exit_code == 0, passing.output
    for name in ("report.json", "report.html", "junit.xml"):
        assert (tmp_path / "pass" / name).is_file()
    suite = ET.parse(tmp_path / "pass" / "junit.xml").getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0"
    assert "&lt;b&gt;tiny&lt;/b&gt;" in (tmp_path / "pass" / "report.html").read_text()

    failing = _gate(inputs, _config(tmp_path, 1e-6, "fail.json"), tmp_path / "fail")
    assert failing.exit_code == 1, failing.output
    suite = ET.parse(tmp_path / "fail" / "junit.xml").getroot()
    assert suite.get("failures") == "1"
    assert json.loads((tmp_path / "fail" / "report.json").read_text())["verdict"] == "fail"

    informational = _gate(inputs, _config(tmp_path, None, "info.json"), tmp_path / "info")
    assert informational.exit_code == 0, informational.output


def test_gate_errors_exit_2(inputs: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"checks": []}')
    assert _gate(inputs, broken, tmp_path / "a").exit_code == 2
    missing = _gate(inputs, tmp_path / "nope.json", tmp_path / "b")
    assert missing.exit_code == 2 and "not found" in missing.output
    # a service that is not there is an error, not a failed verdict
    unreachable = _gate(
        inputs,
        _config(tmp_path, 1.0),
        tmp_path / "c",
        "--server",
        "http://127.0.0.1:9",
        "--key",
        "k",
    )
    assert unreachable.exit_code == 2
    # every exit 2 leaves a junit.xml with one errored case and a report.json naming the cause
    for out, cause in (("a", "config"), ("b", "not found"), ("c", "127.0.0.1:9")):
        suite = ET.parse(tmp_path / out / "junit.xml").getroot()
        assert suite.get("errors") == "1" and suite.get("failures") == "0", out
        (error,) = suite.iter("error")
        assert cause in error.get("message", ""), (out, error.attrib)
        stated = json.loads((tmp_path / out / "report.json").read_text())
        assert stated["status"] == "error" and stated["verdict"] is None
        assert cause in stated["error"]["detail"], (out, stated)


def test_gate_error_replaces_an_earlier_runs_verdict(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _gate(inputs, _config(tmp_path, 1e6, "pass.json"), out).exit_code == 0
    assert (out / "report.html").is_file()
    again = _gate(inputs, tmp_path / "missing.json", out)
    assert again.exit_code == 2
    assert json.loads((out / "report.json").read_text())["status"] == "error"
    assert not (out / "report.html").exists()


def test_signed_local_audit_verifies_and_a_changed_byte_fails(inputs: Path, tmp_path: Path) -> None:
    key = tmp_path / "keys" / "ed25519.pem"
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "audit",
            "--model",
            str(inputs / "model.pt"),
            "--spec",
            str(inputs / "spec.json"),
            "--config",
            str(_config(tmp_path, 1e6)),
            "--out",
            str(out),
            "--quiet",
            "--sign-key",
            str(key),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file()
    report = out / "report.json"
    assert runner.invoke(app, ["verify", str(report), "--key", str(key)]).exit_code == 0

    text = report.read_text(encoding="utf-8")
    position = text.index('"seed":') + len('"seed":')  # change one digit of the content
    digit = text[position]
    tampered = tmp_path / "tampered.json"
    tampered.write_text(text[:position] + ("1" if digit != "1" else "2") + text[position + 1 :])
    assert runner.invoke(app, ["verify", str(tampered), "--key", str(key)]).exit_code == 1
    other_key = tmp_path / "other.pem"
    assert runner.invoke(app, ["verify", str(report), "--key", str(other_key)]).exit_code == 2
