"""Upload a model, submit an audit, poll it, read the report: through real HTTP, a real worker
process, the real Redis broker, the sandboxed runner, on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import audit_request, client_for, upload_ready_model

pytestmark = pytest.mark.integration


def test_audit_end_to_end(make_stack, database_url: str, model_file: Path) -> None:
    stack = make_stack(database_url)
    with client_for(stack) as client:
        model_id = upload_ready_model(client, model_file)
        submitted = client.submit_audit(audit_request(model_id))
        assert submitted["status"] in ("queued", "running")
        final = client.wait_audit(submitted["id"], timeout=240)
        assert final["status"] == "succeeded", final.get("error")
        assert final["progress"]["fraction"] == 1.0
        assert final["verdict"] in ("pass", "fail", "info")

        report = client.get_report(submitted["id"])
        assert report["verdict"] == final["verdict"]
        assert report["model"]["sha256"] == client.get_model(model_id)["sha256"]
        (check,) = report["checks"]
        assert check["kind"] == "random_noise" and check["subject"] == "model"
        assert [level["level"] for level in check["levels"]] == [0.01, 0.05]
        assert report["config"]["seed"] == 7

        # the report listed as an artifact is served as such
        response = httpx.get(
            f"{stack.api_url}/v1/audits/{submitted['id']}/artifacts/report.json",
            headers={"Authorization": client._http.headers["Authorization"]},
        )
        assert response.status_code == 200
        assert response.json()["verdict"] == report["verdict"]

    # another tenant sees nothing of it
    with client_for(stack, tenant="other") as other:
        response = other._http.get(f"/v1/audits/{submitted['id']}")
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/problem+json")


def test_rejected_model_reason(make_stack, tmp_path: Path) -> None:
    """A model whose output shape does not match its spec is rejected with that reason."""
    import torch

    class Shrinks(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[..., :-1]

    path = tmp_path / "shrinks.pt"
    torch.jit.save(torch.jit.script(Shrinks()), str(path))
    stack = make_stack(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with client_for(stack) as client:
        from tests.integration.conftest import MODEL_SPEC

        uploaded = client.upload_model(path, MODEL_SPEC)
        model = client.wait_model(uploaded["id"], timeout=120)
        assert model["status"] == "rejected"
        assert "shape" in model["reason"]


def test_embedded_filesystem_broker(make_stack, model_file: Path, tmp_path: Path) -> None:
    """The single-host fallback `make demo` uses when no redis-server is installed."""
    stack = make_stack(f"sqlite:///{tmp_path / 'db.sqlite'}", broker="filesystem://")
    assert stack.broker_url == "filesystem://"
    with client_for(stack) as client:
        model_id = upload_ready_model(client, model_file)
        final = client.wait_audit(client.submit_audit(audit_request(model_id))["id"], timeout=240)
        assert final["status"] == "succeeded", final.get("error")
