"""The query-only worst-case search (workers.engine.query_search) and the endpoint model
(workers.engine.endpoint_model): known answers on linear maps of known σ_max, and forward-only
checks run unchanged through a real endpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.callback_targets import parse_allow_list
from schemas.endpoints import EndpointLimits, EndpointTarget
from schemas.operators import DenoisingOperator
from tests.engine.tiny_models import config, spec
from tests.fixtures.oip_server import LinearModel, OIPServer
from workers.engine.attacks import ThreatModel
from workers.engine.audit import run_audit_with_model
from workers.engine.context import PassCounter, Subject
from workers.engine.endpoint_model import EndpointModule
from workers.engine.operators import build_operator
from workers.engine.query_search import QuerySearchSettings, query_worst_case_search
from workers.shared.errors import EngineInputError
from workers.shared.inference_protocol import InferenceClient

SIDE = 16
SHAPE = (1, SIDE, SIDE)
SPECTRA = {
    "gap": [3.0, 1.0, 0.5],  # rank 3, a clear top direction
    "smooth": list(np.geomspace(3.0, 0.05, SIDE * SIDE)),  # full rank, slowly decaying
}


def forward_only(matrix: np.ndarray, counter: PassCounter) -> Subject:
    weights = torch.tensor(matrix, dtype=torch.float32)

    def reconstruct(y: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "the query-only search asked for a gradient"
        counter.forward += y.shape[0]
        return (y.flatten(1) @ weights.T).view(y.shape)

    return Subject(name="model", reconstruct=reconstruct, counter=counter)


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_the_query_only_search_reaches_nine_tenths_of_sigma_max(spectrum: str) -> None:
    """Ψ = W, t = Ψ(y): the worst ‖Ψ(y+e) − Ψ(y)‖ = ‖We‖ over ‖e‖ ≤ ε is ε·σ_max; within
    the default budget the search finds at least 0.9 of it at every level."""
    linear = LinearModel(SHAPE, SHAPE, SPECTRA[spectrum], seed=3)
    counter = PassCounter()
    subject = forward_only(linear.matrix, counter)
    operator = build_operator(DenoisingOperator(), SHAPE)
    x = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    threat = ThreatModel(levels=(0.05, 0.01), target="reconstruction")
    settings = QuerySearchSettings()
    outcomes = query_worst_case_search(subject, operator, x, x, threat, settings, seeds=[1, 2])
    assert [o.level for o in outcomes] == [0.05, 0.01]
    weights = torch.tensor(linear.matrix, dtype=torch.float32)
    for outcome in outcomes:
        e = outcome.perturbation
        radius = outcome.level * x.flatten(1).norm(dim=1)
        assert (e.flatten(1).norm(dim=1) <= radius * (1 + 1e-5)).all()  # inside the ball
        reached = (e.flatten(1) @ weights.T).norm(dim=1) / (radius * linear.sigma_max)
        assert (reached >= 0.9).all(), (spectrum, outcome.level, reached)
        assert torch.allclose(outcome.objective, ((e.flatten(1) @ weights.T) ** 2).sum(1))
    # the documented budget, exactly: per image and level, plus the clean reconstruction
    assert counter.forward == 2 * (1 + 2 * settings.queries_per_level())


def test_the_search_is_reproducible() -> None:
    linear = LinearModel(SHAPE, SHAPE, [2.0, 1.0], seed=4)
    operator = build_operator(DenoisingOperator(), SHAPE)
    x = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(5))
    threat = ThreatModel(levels=(0.02,), target="reconstruction")
    settings = QuerySearchSettings(steps=5, directions=4)
    runs = [
        query_worst_case_search(
            forward_only(linear.matrix, PassCounter()), operator, x, x, threat, settings, [7]
        )[0].perturbation
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.fixture
def served() -> tuple[OIPServer, LinearModel]:
    linear = LinearModel(SHAPE, SHAPE, [1.5, 1.0, 0.5], seed=6)
    return OIPServer(linear, SHAPE, SHAPE), linear


def endpoint_module(server: OIPServer) -> EndpointModule:
    target = EndpointTarget(url=server.url, model_name=server.name)
    limits = EndpointLimits(max_batch=64, requests_per_second=1000)
    client = InferenceClient(target, limits=limits, allow=parse_allow_list("127.0.0.1"))
    return EndpointModule(client, SHAPE)


def test_random_noise_runs_unchanged_through_an_endpoint(
    served: tuple[OIPServer, LinearModel], tmp_path: Path
) -> None:
    """The same audit of the same linear map, white-box and through its endpoint, agrees; every
    forward pass of the endpoint audit is a query in the ledger."""
    server, linear = served
    weights = torch.tensor(linear.matrix, dtype=torch.float32)

    class Local(torch.nn.Module):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return (y.flatten(1) @ weights.T).view(y.shape)

    cfg = config(checks=[{"kind": "random_noise", "levels": [0.05, 0.2], "samples": 3}])
    model_spec = spec(SHAPE, "image")
    local = run_audit_with_model(
        Local(), model_spec, cfg, out_dir=tmp_path / "local", model_sha256="0" * 64
    )
    with server:
        module = endpoint_module(server)
        with module.client, module.scope("random_noise"):
            remote = run_audit_with_model(
                module, model_spec, cfg, out_dir=tmp_path / "remote", model_sha256="0" * 64
            )
    for ours, theirs in zip(
        local["checks"][0]["levels"], remote["checks"][0]["levels"], strict=True
    ):
        assert theirs["relative_error"]["mean"] == pytest.approx(
            ours["relative_error"]["mean"], rel=1e-5
        )
        assert theirs["failures"] == ours["failures"]
    ledger = module.client.ledger.to_json()
    assert ledger["failures"] == 0 and ledger["sent"] == ledger["answered"]
    assert ledger["answered"] == sum(r.batch for r in server.requests)
    assert {row["check"] for row in ledger["by_check"]} <= {"random_noise", "metadata"}


def test_an_endpoint_gives_no_gradient(served: tuple[OIPServer, LinearModel]) -> None:
    server, _ = served
    with server:
        module = endpoint_module(server)
        with module.client, pytest.raises(EngineInputError, match="no gradients"):
            module(torch.zeros(1, *SHAPE, requires_grad=True))
        assert server.requests == []
