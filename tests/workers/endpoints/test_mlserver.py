"""The endpoint client and the query-only search against a real third-party Open Inference
Protocol server: MLServer (in its own venv, `make mlserver`: its FastAPI pin clashes with ours)
on loopback, serving a custom runtime, a numpy linear map of known singular values. The failure
cases are the project's own fault-injecting endpoint's (tests/fixtures/oip_server.py).

MLServer 1.7.1 does not read the binary tensor data extension on REST (its server metadata
lists no extension; a binary body declared as JSON gets a 422): the client's `binary="auto"`
negotiates once and falls back to JSON (the last tests). The other tests send JSON only, so
their counts are the queries' own."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from schemas.callback_targets import parse_allow_list
from schemas.endpoints import EndpointLimits, EndpointTarget
from schemas.operators import DenoisingOperator
from tests.fixtures.mlserver import Served, serve_linear
from tests.fixtures.oip_server import LinearModel
from workers.engine.attacks import ThreatModel, per_sample_norm
from workers.engine.context import PassCounter, Subject
from workers.engine.endpoint_model import EndpointModule
from workers.engine.operators import build_operator
from workers.engine.query_search import QuerySearchSettings, query_worst_case_search
from workers.shared.inference_protocol import (
    Binary,
    EndpointAnswerInvalid,
    InferenceClient,
    RetryPolicy,
)

pytestmark = pytest.mark.needs("mlserver")

SHAPE = (1, 8, 8)
SINGULAR_VALUES = [2.0, 1.0, 0.5, 0.25]


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    linear = LinearModel(SHAPE, SHAPE, SINGULAR_VALUES, seed=11)
    with serve_linear(tmp_path_factory.mktemp("mlserver"), linear) as served:
        yield served


def client(served: Served, binary: Binary = "never", **target: str) -> InferenceClient:
    return InferenceClient(
        EndpointTarget(url=served.url, model_name=target.get("model_name", "linear")),
        limits=EndpointLimits(max_batch=256, requests_per_second=1000),
        allow=parse_allow_list("127.0.0.1"),
        retry=RetryPolicy(attempts=2, backoff_seconds=0.01),
        binary=binary,
    )


def test_metadata_and_answers_of_mlserver(mlserver: Served) -> None:
    with client(mlserver) as endpoint:
        metadata = endpoint.metadata()
        assert metadata.name == "linear"
        assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [
            ("input", "FP32", (-1, *SHAPE))
        ]
        assert [t.name for t in metadata.outputs] == ["output"]
        assert endpoint.ready()
        x = np.random.default_rng(0).random((5, *SHAPE), dtype=np.float32)
        answer = endpoint.infer(x, expect=SHAPE)
        assert answer.shape == (5, *SHAPE)
        np.testing.assert_allclose(answer, mlserver.linear(x), rtol=1e-5, atol=1e-6)
        assert endpoint.ledger.sent == 5


def test_a_batch_over_max_batch_is_split_and_reassembled_in_order(mlserver: Served) -> None:
    target = EndpointTarget(url=mlserver.url, model_name="linear")
    small = EndpointLimits(max_batch=2, requests_per_second=1000, concurrency=3)
    allow = parse_allow_list("127.0.0.1")
    with InferenceClient(target, limits=small, allow=allow, binary="never") as endpoint:
        x = np.random.default_rng(1).random((7, *SHAPE), dtype=np.float32)
        np.testing.assert_allclose(
            endpoint.infer(x, expect=SHAPE), mlserver.linear(x), rtol=1e-5, atol=1e-6
        )
        ledger = endpoint.ledger.to_json()
        # the metadata (the tensors' names), then 7 inputs in parts of 2, 2, 2, 1
        assert (ledger["requests"], ledger["sent"], ledger["answered"]) == (5, 7, 7)


def test_an_unknown_model_fails_at_once(mlserver: Served) -> None:
    """MLServer's 404 is a refusal: not retried, and never read as an answer."""
    with (
        client(mlserver, model_name="no-such-model") as endpoint,
        pytest.raises(EndpointAnswerInvalid, match="answered 404"),
    ):
        endpoint.metadata()


def test_the_query_only_search_finds_the_known_worst_case_through_mlserver(
    mlserver: Served,
) -> None:
    """Ψ = W served by MLServer: within the default budget the query-only search reaches at
    least 0.9 of the exact worst error δ‖y‖·σ_max, every query over HTTP and in the ledger."""
    with client(mlserver) as endpoint:
        module = EndpointModule(endpoint, SHAPE)
        counter = PassCounter()

        def reconstruct(y: torch.Tensor) -> torch.Tensor:
            counter.forward += y.shape[0]
            return module(y)

        subject = Subject(name="model", reconstruct=reconstruct, counter=counter)
        operator = build_operator(DenoisingOperator(), SHAPE)
        x = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(2))
        threat = ThreatModel(levels=(0.05,), target="reconstruction")
        settings = QuerySearchSettings()
        with module.scope("worst_case", 0.05):
            (outcome,) = query_worst_case_search(subject, operator, x, x, threat, settings, [3])
        weights = torch.tensor(mlserver.linear.matrix, dtype=torch.float64)
        e = outcome.perturbation.flatten(1).double()
        radius = 0.05 * per_sample_norm(x).double()
        assert float(per_sample_norm(e)) <= float(radius) * (1 + 1e-5)
        reached = float(per_sample_norm(e @ weights.T) / (radius * mlserver.linear.sigma_max))
        assert reached >= 0.9, reached
        # the documented budget, every input sent once (no failures, no retries)
        entries = x[0].numel()  # fewer than 2·65 + 1: a step makes one difference per entry
        assert endpoint.ledger.sent == 1 + settings.queries_per_level(entries) == counter.forward


def offers_binary(served: Served) -> bool:
    """Whether the server says it reads the binary tensor data extension (Triton's name)."""
    extensions = httpx.get(f"{served.url}/v2", timeout=10).json().get("extensions", [])
    return "binary_tensor_data" in extensions


def test_auto_mode_works_against_mlserver(mlserver: Served) -> None:
    """Binary where MLServer offers it, else one refused binary request and JSON after it: the
    same answers, bit for bit, as a JSON-only client's; the refusal is charged to the ledger as
    a request whose inputs were sent, and to no failure count."""
    x = np.random.default_rng(3).random((5, *SHAPE), dtype=np.float32)
    with client(mlserver, binary="never") as plain:
        expected = plain.infer(x, expect=SHAPE)
    with client(mlserver, binary="auto") as endpoint:
        assert endpoint.infer(x, expect=SHAPE).tobytes() == expected.tobytes()
        supported = offers_binary(mlserver)
        assert endpoint.encoding == ("binary" if supported else "json")
        assert not supported  # MLServer 1.7.1: no binary tensor data on REST
        ledger = endpoint.ledger.to_json()
        # the metadata, the refused binary request (5 inputs), the JSON one
        assert (ledger["requests"], ledger["sent"], ledger["answered"]) == (3, 10, 5)
        assert (ledger["failures"], ledger["retries"]) == (0, 0)
        assert endpoint.breaker.state == "closed"
        assert endpoint.infer(x, expect=SHAPE).tobytes() == expected.tobytes()
        assert endpoint.ledger.sent == 15  # JSON at once: no second negotiation


def test_auto_negotiates_once_for_a_split_batch(mlserver: Served) -> None:
    """The parts of a split batch wait for the first one's negotiation, then go as JSON."""
    target = EndpointTarget(url=mlserver.url, model_name="linear")
    small = EndpointLimits(max_batch=2, requests_per_second=1000, concurrency=3)
    with InferenceClient(target, limits=small, allow=parse_allow_list("127.0.0.1")) as endpoint:
        x = np.random.default_rng(4).random((7, *SHAPE), dtype=np.float32)
        np.testing.assert_allclose(
            endpoint.infer(x, expect=SHAPE), mlserver.linear(x), rtol=1e-5, atol=1e-6
        )
        ledger = endpoint.ledger.to_json()
        # the metadata, the refused binary part of 2, then the parts of 2, 2, 2, 1 as JSON
        assert (ledger["requests"], ledger["sent"], ledger["answered"]) == (6, 9, 7)


def test_mlserver_refuses_a_binary_request_with_a_422(mlserver: Served) -> None:
    """What the negotiation meets: MLServer reads the body as JSON, and fails (a 422, which the
    client takes for a refusal of the extension)."""
    x = np.zeros((1, *SHAPE), dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    answer = httpx.post(
        f"{mlserver.url}/v2/models/linear/infer",
        content=header + x.tobytes(),
        headers={
            "Content-Type": "application/json",
            "Inference-Header-Content-Length": str(len(header)),
        },
        timeout=10,
    )
    assert answer.status_code == 422, answer.text
    assert "json_invalid" in answer.text
