"""The endpoint client and the query-only search against a real third-party Open Inference
Protocol server: MLServer (in its own venv, `make mlserver`: its FastAPI pin clashes with ours)
on loopback, serving a custom runtime, a numpy linear map of known singular values. The failure
cases are the project's own fault-injecting endpoint's (tests/fixtures/oip_server.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import torch

from schemas.callback_targets import parse_allow_list
from schemas.endpoints import EndpointLimits, EndpointTarget
from schemas.operators import DenoisingOperator
from tests.conftest import MLSERVER_BINARY
from tests.fixtures.oip_server import LinearModel
from workers.engine.attacks import ThreatModel, per_sample_norm
from workers.engine.context import PassCounter, Subject
from workers.engine.endpoint_model import EndpointModule
from workers.engine.operators import build_operator
from workers.engine.query_search import QuerySearchSettings, query_worst_case_search
from workers.shared.inference_protocol import EndpointAnswerInvalid, InferenceClient, RetryPolicy

pytestmark = pytest.mark.needs("mlserver")

SHAPE = (1, 8, 8)
SINGULAR_VALUES = [2.0, 1.0, 0.5, 0.25]

# MLServer's custom runtime: W from weights.npy beside it, y = W x per input
RUNTIME = """
from pathlib import Path

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class LinearRuntime(MLModel):
    async def load(self) -> bool:
        self.matrix = np.load(Path(__file__).with_name("weights.npy"))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        flat = x.reshape(len(x), -1).astype(np.float64)
        out = (flat @ self.matrix.T).reshape(x.shape).astype(np.float32)
        output = NumpyCodec.encode_output("output", out)
        return InferenceResponse(model_name=self.name, outputs=[output])
"""


@dataclass
class Served:
    url: str
    linear: LinearModel
    process: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("mlserver")
    model_dir = root / "linear"
    model_dir.mkdir()
    linear = LinearModel(SHAPE, SHAPE, SINGULAR_VALUES, seed=11)
    np.save(model_dir / "weights.npy", linear.matrix)
    (model_dir / "linear_runtime.py").write_text(RUNTIME)
    tensor = {"datatype": "FP32", "shape": [-1, *SHAPE]}
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "linear",
                "implementation": "linear_runtime.LinearRuntime",
                "inputs": [{"name": "input", **tensor}],
                "outputs": [{"name": "output", **tensor}],
            }
        )
    )
    http_port = _free_port()
    (root / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": _free_port(),
                "metrics_port": _free_port(),
                "metrics_endpoint": None,
                "parallel_workers": 0,  # inference in the server's own process
            }
        )
    )
    log = (root / "mlserver.log").open("wb")
    environment = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    process = subprocess.Popen(
        [str(MLSERVER_BINARY), "start", str(root)],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environment,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (root / "mlserver.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v2/models/linear/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (root / "mlserver.log").read_text()[-3000:]
            time.sleep(0.2)
        yield Served(url, linear, process)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        log.close()


def client(served: Served, **target: str) -> InferenceClient:
    return InferenceClient(
        EndpointTarget(url=served.url, model_name=target.get("model_name", "linear")),
        limits=EndpointLimits(max_batch=256, requests_per_second=1000),
        allow=parse_allow_list("127.0.0.1"),
        retry=RetryPolicy(attempts=2, backoff_seconds=0.01),
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
    with InferenceClient(target, limits=small, allow=parse_allow_list("127.0.0.1")) as endpoint:
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
        assert endpoint.ledger.sent == 1 + settings.queries_per_level() == counter.forward
