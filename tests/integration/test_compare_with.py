"""An audit that compares a model with its previous version, through real HTTP, a real worker
process, Redis and the sandboxed runner: both models run on the same images and draws, and
the report carries the comparison."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.conftest import (
    ResidualCNN,
    audit_request,
    client_for,
    upload_ready_model,
)

pytestmark = pytest.mark.integration


def test_a_new_version_is_compared_with_the_released_one(
    make_stack, model_file: Path, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    retrained = tmp_path / "retrained.pt"
    torch.jit.save(torch.jit.script(ResidualCNN(gain=3.0).eval()), str(retrained))
    stack = make_stack(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with client_for(stack) as client:
        released = upload_ready_model(client, model_file)
        candidate = upload_ready_model(client, retrained)
        submitted = client.submit_audit(
            audit_request(candidate, compare_with={"model_id": released})
        )
        final = client.wait_audit(submitted["id"], timeout=300)
        assert final["status"] == "succeeded", final
        report = client.get_report(submitted["id"])

    comparison = report["comparison"]
    assert comparison["reference"]["id"] == released
    subjects = {check["subject"] for check in report["checks"]}
    assert subjects == {"model", "reference"}
    (check,) = comparison["checks"]
    assert check["kind"] == "random_noise"
    assert [figure["level"] for figure in check["figures"]] == [0.01, 0.05]
    for figure in check["figures"]:
        assert figure["difference"] == pytest.approx(figure["model"] - figure["reference"])
    # the audit's verdict is the comparison's when the comparison fails
    if comparison["verdict"] == "fail":
        assert report["verdict"] == "fail"
