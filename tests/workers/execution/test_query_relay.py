"""The query relay between a runner and its worker (workers.sandbox.query_relay, the runner's
half; workers.execution.query_relay, the worker's): batches cross as files in the job directory,
the worker's client queries the endpoint and charges its ledger, and every failure reaches the
runner as a named failure, never as an answer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas.callback_targets import parse_allow_list
from schemas.endpoints import EndpointLimits, EndpointTarget
from schemas.runner import QUERIES_DIR, RunnerEvent
from tests.fixtures.oip_server import Fault, LinearModel, OIPServer
from workers.execution.query_relay import QueryRelay
from workers.sandbox.query_relay import RelayedQueries
from workers.shared.errors import EndpointQueryFailed
from workers.shared.inference_protocol import InferenceClient, RetryPolicy
from workers.shared.query_ledger import QueryLedger

SHAPE = (1, 4, 4)


def relay_of(server: OIPServer, budget: int | None = None) -> QueryRelay:
    client = InferenceClient(
        EndpointTarget(url=server.url, model_name=server.name),
        limits=EndpointLimits(max_batch=3),
        allow=parse_allow_list("127.0.0.1"),
        ledger=QueryLedger(budget=budget),
        retry=RetryPolicy(attempts=2, backoff_seconds=0.01),
    )
    return QueryRelay(client)


class Pipe:
    """The runner's side of the pipe: each event it emits is answered by the worker's relay at
    once, and the reply line waits to be read from 'stdin'."""

    def __init__(self, relay: QueryRelay, job_dir: Path) -> None:
        self.relay, self.job_dir = relay, job_dir
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})
        reply = self.relay.answer(RunnerEvent(event=event, **fields), self.job_dir)  # type: ignore[arg-type]
        self.lines.append(reply.decode())

    def readline(self) -> str:
        return self.lines.pop(0) if self.lines else ""


def test_a_relayed_batch_is_answered_and_charged_to_its_check_and_level(tmp_path: Path) -> None:
    linear = LinearModel(SHAPE, SHAPE, [2.0, 1.0], seed=4)
    x = np.random.default_rng(0).standard_normal((5, *SHAPE)).astype(np.float32)
    with OIPServer(linear, SHAPE, SHAPE) as server, relay_of(server) as relay:
        pipe = Pipe(relay, tmp_path)
        queries = RelayedQueries(tmp_path, pipe, pipe)  # type: ignore[arg-type]
        out = queries.infer(x, scope=("worst_case", 0.05), expect=list(SHAPE))
        np.testing.assert_allclose(out, linear(x), rtol=1e-6)
        assert [seen.batch for seen in server.requests if seen.path.endswith("/infer")] == [
            3,
            2,
        ]
    ledger = relay.ledger.to_json()
    assert ledger["sent"] == ledger["answered"] == 5
    # (the client asks the model's metadata once, for the input's name: a request, no input)
    assert [row for row in ledger["by_check"] if row["check"] != "metadata"] == [
        {
            "check": "worst_case",
            "level": 0.05,
            "sent": 5,
            "answered": 5,
            "requests": 2,
            "failures": 0,
            "retries": 0,
        }
    ]
    assert pipe.events[0]["file"] == f"{QUERIES_DIR}/0.in.npy"
    assert os.listdir(tmp_path / QUERIES_DIR) == []  # both files removed once read


def test_failures_reach_the_runner_as_named_failures(tmp_path: Path) -> None:
    linear = LinearModel(SHAPE, SHAPE, [1.0], seed=1)
    x = np.zeros((2, *SHAPE), dtype=np.float32)
    with OIPServer(linear, SHAPE, SHAPE) as server, relay_of(server, budget=6) as relay:
        pipe = Pipe(relay, tmp_path)
        queries = RelayedQueries(tmp_path, pipe, pipe)  # type: ignore[arg-type]
        server.fail(Fault.status_code(503), Fault.status_code(503))
        with pytest.raises(EndpointQueryFailed, match="failed 2 times") as failed:
            queries.infer(x, scope=("random_noise", 0.1))
        assert not failed.value.budget_spent
        server.fail(Fault.nan(), Fault.nan())
        with pytest.raises(EndpointQueryFailed, match="non-finite"):
            queries.infer(x[:1], scope=("random_noise", 0.1))
        # 4 inputs sent (2 attempts of 2), 2 more (2 attempts of 1): the budget of 6 is spent
        with pytest.raises(EndpointQueryFailed, match="budget of 6 is spent") as spent:
            queries.infer(x, scope=("random_noise", 0.1))
        assert spent.value.budget_spent
    assert relay.ledger.to_json()["answered"] == 0


@pytest.mark.parametrize(
    ("file", "info", "words"),
    [
        ("queries/../job.json", {"id": 0, "check": "c"}, "no query file of its own"),
        ("queries/1.in.npy", {"id": 0, "check": "c"}, "no query file of its own"),
        ("queries/0.in.npy", {"id": 0}, "names the check"),
        ("queries/0.in.npy", {"id": 0, "check": "c", "level": "high"}, "level is a number"),
        ("queries/0.in.npy", {"id": 0, "check": "c", "expect": [0]}, "positive sizes"),
    ],
)
def test_a_query_the_worker_does_not_send_is_refused(
    tmp_path: Path, file: str, info: dict[str, Any], words: str
) -> None:
    (tmp_path / QUERIES_DIR).mkdir()
    np.save(tmp_path / QUERIES_DIR / "0.in.npy", np.zeros((1, *SHAPE), dtype=np.float32))
    with OIPServer(LinearModel(SHAPE, SHAPE, [1.0]), SHAPE, SHAPE) as server:
        with relay_of(server) as relay:
            reply = json.loads(
                relay.answer(RunnerEvent(event="query", file=file, info=info), tmp_path)
            )
        assert not [seen for seen in server.requests if seen.path.endswith("/infer")]
    assert reply["ok"] is False and words in reply["reason"]


@pytest.mark.parametrize("content", ["link", "nan", "int", "pickle"])
def test_a_hostile_query_file_is_refused(tmp_path: Path, content: str) -> None:
    queries = tmp_path / QUERIES_DIR
    queries.mkdir()
    path = queries / "0.in.npy"
    if content == "link":
        (tmp_path / "secret").write_text("x")
        path.symlink_to(tmp_path / "secret")
    elif content == "nan":
        np.save(path, np.full((1, *SHAPE), np.nan, dtype=np.float32))
    elif content == "int":
        np.save(path, np.zeros((1, *SHAPE), dtype=np.int64))
    else:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with OIPServer(LinearModel(SHAPE, SHAPE, [1.0]), SHAPE, SHAPE) as server:
        with relay_of(server) as relay:
            event = RunnerEvent(
                event="query", file="queries/0.in.npy", info={"id": 0, "check": "c"}
            )
            reply = json.loads(relay.answer(event, tmp_path))
        assert not [seen for seen in server.requests if seen.path.endswith("/infer")]
    assert reply == {"id": 0, "ok": False, "reason": reply["reason"]}
