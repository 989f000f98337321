"""An endpoint model audited end to end (issue 24): registered over HTTP by its Open Inference
Protocol endpoint, a real third-party server (MLServer, tests/fixtures/mlserver.py) serving a
linear map of known singular values; probed by a worker; audited by the gateway, a real Celery
worker and the sandboxed runner, whose queries the worker relays. The query-only worst case
reaches the exact answer σ_max·δ‖y‖ within 10 %, the report carries the ledger and the
endpoint, and the HTML and JUnit say the audit was query-only and with which budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.mlserver import serve_linear
from tests.fixtures.oip_server import LinearModel
from tests.integration.conftest import client_for

pytestmark = [pytest.mark.integration, pytest.mark.needs("mlserver")]

SHAPE = (1, 8, 8)
LEVEL = 0.05
BUDGET = 60_000


def test_an_endpoint_model_is_audited_through_the_gateway_and_a_worker(
    make_stack, tmp_path: Path
) -> None:
    linear = LinearModel(SHAPE, SHAPE, [2.0, 1.0, 0.5, 0.25], seed=5)
    (tmp_path / "mlserver").mkdir()
    with serve_linear(tmp_path / "mlserver", linear) as served:
        stack = make_stack(
            f"sqlite:///{tmp_path / 'db.sqlite'}", TIGHTROPE_ENDPOINT_ALLOW="127.0.0.1"
        )
        with client_for(stack) as client:
            registered = client.register_endpoint(
                {
                    "url": served.url,
                    "model_name": "linear",
                    "spec": {
                        "name": "vendor-denoiser",
                        "task": "reconstruction",
                        "input": "measurement",
                        "image_shape": list(SHAPE),
                        "value_range": [0.0, 1.0],
                    },
                    "auth": {"secret": "Bearer never-in-a-report"},
                    "limits": {"requests_per_second": 500, "max_batch": 256, "concurrency": 2},
                }
            )
            model = client.wait_model(registered["id"], timeout=60)
            assert model["status"] == "ready", model
            submitted = client.submit_audit(
                {
                    "model_id": model["id"],
                    "dataset": {"builtin": "shepp_logan", "count": 2, "size": 8, "seed": 0},
                    "operator": {"kind": "denoising"},
                    "checks": [
                        {"kind": "random_noise", "levels": [LEVEL], "samples": 2},
                        {"kind": "worst_case", "levels": [LEVEL]},
                        {"kind": "false_negative", "placements": 2},
                    ],
                    "seed": 0,
                    "device": "cpu",
                    "budget": {"queries": BUDGET, "images_per_shard": 1},
                }
            )
            final = client.wait_audit(submitted["id"], timeout=300)
            assert final["status"] == "succeeded", final.get("error")
            report = client.get_report(submitted["id"])
            html = client.get_report_file(submitted["id"], "report.html")
            junit = client.get_report_file(submitted["id"], "report.junit.xml")

    queries = report["queries"]
    assert queries["query_only"] is True and queries["budget"] == BUDGET
    assert 0 < queries["sent"] <= BUDGET and queries["failures"] == 0
    charged = {row["check"] for row in queries["by_check"]}
    assert {"random_noise", "worst_case", "false_negative", "probe"} <= charged
    assert report["model"]["format"] == "endpoint"
    assert report["model"]["endpoint"]["url"] == served.url

    # the query-only worst case against the exact answer: for Ψ = W and the denoising operator
    # the largest ‖Ψ(y + e) − Ψ(y)‖ over ‖e‖ ≤ δ‖y‖ is σ_max·δ‖y‖: the found perturbation's
    # ‖Ψ(y + e) − Ψ(y)‖ / ‖e‖ (lipschitz_lower_bound) is σ_max at best, on the ball's edge
    worst = next(check for check in report["checks"] if check["kind"] == "worst_case")
    assert worst["search"] == "query-only"
    (level,) = worst["levels"]
    bound = level["lipschitz_lower_bound"]
    assert level["relative_perturbation"]["max"] == pytest.approx(LEVEL, rel=1e-3)
    assert 0.9 * linear.sigma_max <= bound["mean"] <= bound["max"] <= linear.sigma_max * 1.001

    text = (html or b"").decode()
    assert "Query-only audit" in text and (f"{BUDGET:,}" in text or str(BUDGET) in text)
    assert b'name="query_only" value="true"' in (junit or b"")
    for document in (str(report).encode(), html or b"", junit or b""):
        assert b"never-in-a-report" not in document
