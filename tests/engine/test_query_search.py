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
from schemas.operators import DenoisingOperator, InpaintingOperator
from tests.engine.tiny_models import config, spec
from tests.fixtures.oip_server import LinearModel, OIPServer
from workers.engine.attacks import ThreatModel
from workers.engine.audit import run_audit_with_model
from workers.engine.context import PassCounter, Subject
from workers.engine.endpoint_model import EndpointModule
from workers.engine.operators import build_operator
from workers.engine.query_search import (
    QuerySearchSettings,
    _ball_maximiser,
    _orthonormal_model,
    query_worst_case_search,
)
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
        assert (reached >= 0.99).all(), (spectrum, outcome.level, reached)
        assert torch.allclose(outcome.objective, ((e.flatten(1) @ weights.T) ** 2).sum(1))
    # the documented budget, exactly: per image and level, plus the clean reconstruction
    assert counter.forward == 2 * (1 + 2 * settings.queries_per_level())


@pytest.mark.parametrize(
    ("side", "seed", "spectrum"), [(8, 11, "gap"), (12, 5, "near"), (20, 9, "decay")]
)
def test_the_default_search_finds_sigma_max_on_linear_maps_of_other_sizes(
    side: int, seed: int, spectrum: str
) -> None:
    """Other sizes, seeds and spectra (a near-tie at the top, a slow decay over every
    direction): the default search's worst case is σ_max·ε to within 1 % at every level."""
    shape = (1, side, side)
    values = {
        "gap": [2.0, 0.7],
        "near": [2.0, 1.97, 1.0],
        "decay": list(np.geomspace(2.0, 0.1, side * side)),
    }[spectrum]
    linear = LinearModel(shape, shape, values, seed=seed)
    subject = forward_only(linear.matrix, PassCounter())
    operator = build_operator(DenoisingOperator(), shape)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed))
    threat = ThreatModel(levels=(0.01, 0.05), target="reconstruction")
    outcomes = query_worst_case_search(
        subject, operator, x, x, threat, QuerySearchSettings(), seeds=[seed]
    )
    weights = torch.tensor(linear.matrix, dtype=torch.float32)
    for outcome in outcomes:
        e = outcome.perturbation.flatten(1)
        radius = outcome.level * x.flatten(1).norm(dim=1)
        reached = (e @ weights.T).norm(dim=1) / (radius * linear.sigma_max)
        assert (reached >= 0.99).all() and (reached <= 1 + 1e-4).all(), (spectrum, reached)


def test_measurement_space_perturbations_stay_on_the_measured_entries() -> None:
    """Inpainting (a mask): the worst error of Ψ = W over perturbations of the measured
    entries alone is ε·σ_max(W P), P the mask's projection; the search reaches it and never
    perturbs an unmeasured entry."""
    shape = (1, 10, 10)
    linear = LinearModel(shape, shape, [3.0, 1.0, 0.5], seed=2)
    operator = build_operator(InpaintingOperator(fraction=0.5, seed=4), shape)
    mask = operator.project(torch.ones(1, *shape)).flatten()
    weights = torch.tensor(linear.matrix, dtype=torch.float32)
    exact = float(torch.linalg.matrix_norm(weights * mask, ord=2))
    subject = forward_only(linear.matrix, PassCounter())
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
    y = operator.A(x)
    threat = ThreatModel(levels=(0.02,), target="reconstruction", space="measurement")
    (outcome,) = query_worst_case_search(
        subject, operator, y, x, threat, QuerySearchSettings(), seeds=[3, 4]
    )
    e = outcome.perturbation.flatten(1)
    assert (e[:, mask == 0] == 0).all()
    radius = 0.02 * operator.norm(y)
    assert (e.norm(dim=1) <= radius * (1 + 1e-5)).all()
    reached = (e @ weights.T).norm(dim=1) / (radius * exact)
    assert (reached >= 0.99).all() and (reached <= 1 + 1e-4).all(), reached


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_trust_region_step_is_the_models_maximiser(seed: int) -> None:
    """argmax ‖c + M w‖ over ‖w‖ ≤ r against a dense sample of the sphere (k = 2) and a
    projected ascent (k = 6): never below either; on the sphere."""
    generator = torch.Generator().manual_seed(seed)
    for k in (2, 6):
        model = torch.randn(9, k, generator=generator, dtype=torch.float64)
        offset = torch.randn(9, generator=generator, dtype=torch.float64)
        w = _ball_maximiser(model, offset, 0.7)
        assert float(w.norm()) == pytest.approx(0.7, rel=1e-6)
        best = float((offset + model @ w).norm())
        if k == 2:
            angles = torch.linspace(0, 2 * np.pi, 20001, dtype=torch.float64)
            ring = 0.7 * torch.stack([angles.cos(), angles.sin()], 1)
            assert best >= float((offset + ring @ model.T).norm(dim=1).max()) - 1e-9
        point = torch.randn(k, generator=generator, dtype=torch.float64)
        for _ in range(2000):
            point = point + 0.01 * model.T @ (offset + model @ point)
            point = point * min(1.0, 0.7 / float(point.norm()))
        assert best >= float((offset + model @ point).norm()) - 1e-9
    # the hard case: c orthogonal to the top direction's image
    model = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    w = _ball_maximiser(model, torch.tensor([0.0, 1.0], dtype=torch.float64), 1.0)
    assert float((torch.tensor([0.0, 1.0], dtype=torch.float64) + model @ w).norm()) >= 2.0 - 1e-9


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


def test_the_model_is_orthonormalised_where_directions_repeat() -> None:
    """A point unmoved for several steps is in each step's basis: exact and near repeats of
    a direction. The basis stays orthonormal, spans the directions, and J on it is exact."""
    generator = torch.Generator().manual_seed(3)
    jacobian = torch.randn(12, 40, generator=generator, dtype=torch.float64)
    first, _ = torch.linalg.qr(torch.randn(40, 6, generator=generator, dtype=torch.float64))
    nudged = first[:, :2] + 1e-13 * torch.randn(40, 2, generator=generator, dtype=torch.float64)
    measured = torch.cat([first, first[:, :3], nudged], 1)  # 11 columns, rank 6
    basis, model = _orthonormal_model(measured, jacobian @ measured)
    assert basis.shape == (40, 6)
    assert torch.allclose(basis.T @ basis, torch.eye(6, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(basis @ (basis.T @ first), first, atol=1e-8)  # the same span
    assert torch.allclose(model, jacobian @ basis, atol=1e-8)
