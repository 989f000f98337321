"""The shipped diffusion sampler (examples/sampler, deepinv's DiffPIR with a denoiser trained by
examples/train_sampler.py) uploaded over HTTP, admitted as `stochastic`, and audited as a sampler
by a real worker and the sandboxed runner (issue 26): a small audit, whose report carries the
noise floor, the hallucination probability with its interval and what each check measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import client_for

pytestmark = pytest.mark.integration

SAMPLER = Path(__file__).resolve().parents[2] / "examples" / "sampler"
FEW = {"draws": 2, "replicates": 2}


def test_the_shipped_sampler_is_audited_as_a_sampler(make_stack, tmp_path: Path) -> None:
    spec = json.loads((SAMPLER / "spec.json").read_text())
    stack = make_stack(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with client_for(stack) as client:
        uploaded = client.upload_model(SAMPLER / "model.pt", spec)
        model = client.wait_model(uploaded["id"], timeout=120)
        assert model["status"] == "ready", model
        assert model["stochastic"] is True and model["output_spread"] > 1e-5
        submitted = client.submit_audit(
            {
                "model_id": model["id"],
                "dataset": {"builtin": "ellipses", "count": 1, "size": 64, "seed": 0},
                "operator": {"kind": "mri", "mask": "cartesian", "acceleration": 4,
                             "center_fraction": 0.08, "seed": 0},
                "checks": [
                    {"kind": "worst_case", "levels": [0.02], "steps": 2, "sampler": FEW},
                    {"kind": "false_positive", "steps": 2, "panels": 0,
                     "sampler": {**FEW, "samples": 4}},
                ],
                "seed": 0,
                "device": "cpu",
            }
        )  # fmt: skip
        final = client.wait_audit(submitted["id"], timeout=240)
        assert final["status"] == "succeeded", final.get("error")
        report = client.get_report(submitted["id"])

    assert report["model"]["stochastic"] is True
    floor = report["model"]["noise_floor"]
    assert floor["value"] > 0 and floor["ci_low"] <= floor["value"] <= floor["ci_high"]
    worst, false_positive = report["checks"]
    assert worst["sampler"]["measures"] and false_positive["sampler"]["measures"]
    assert worst["sampler"]["draws"] == 2
    (level,) = worst["levels"]  # the average map's figure, with its standard error over K = 2
    assert level["standard_error"]["relative_error"]["mean"] is not None
    hallucination = false_positive["hallucination"]
    for point in ("clean", "attacked"):
        probability = hallucination[point]
        assert probability["trials"] == 4  # 1 image × S = 4 single draws
        assert 0.0 <= probability["ci_low"] <= probability["estimate"] <= probability["ci_high"]
