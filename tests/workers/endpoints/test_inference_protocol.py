"""The Open Inference Protocol client (workers.shared.inference_protocol) against the
project's own fault-injecting endpoint (tests/fixtures/oip_server.py), over real sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from schemas.callback_targets import parse_allow_list
from schemas.endpoints import EndpointLimits, EndpointTarget
from tests.fixtures.oip_server import Fault, LinearModel, OIPServer
from workers.shared.inference_protocol import (
    BreakerPolicy,
    CircuitOpen,
    EndpointAnswerInvalid,
    EndpointRefused,
    EndpointUnavailable,
    InferenceClient,
    RetryPolicy,
    retry_after_seconds,
)
from workers.shared.query_ledger import QueryBudgetExhausted, QueryLedger, percentile

SHAPE = (1, 4, 4)
LOOPBACK = parse_allow_list("127.0.0.1")
FAST_RETRY = RetryPolicy(attempts=3, backoff_seconds=0.01)
SECRET = "Bearer s3cr3t-token-value"


@pytest.fixture
def model() -> LinearModel:
    return LinearModel(SHAPE, SHAPE, [3.0, 1.0, 0.5], seed=1)


@pytest.fixture
def server(model: LinearModel) -> Iterator[OIPServer]:
    with OIPServer(model, SHAPE, SHAPE) as running:
        yield running


def client_for(
    server: OIPServer, *, limits: EndpointLimits | None = None, **options: object
) -> InferenceClient:
    target = EndpointTarget(url=server.url, model_name=server.name, model_version="1")
    options.setdefault("allow", LOOPBACK)
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("auth", ("Authorization", SECRET))
    return InferenceClient(target, limits=limits, **options)  # type: ignore[arg-type]


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def test_metadata_ready_and_infer_give_the_model(server: OIPServer, model: LinearModel) -> None:
    with client_for(server) as client:
        meta = client.metadata()
        assert (meta.name, meta.inputs[0].name, meta.inputs[0].shape) == (
            "model",
            "input",
            (-1, *SHAPE),
        )
        assert client.ready()
        x = batch(3)
        out = client.infer(x, scope=("random_noise", 0.01), images=[0, 1, 2], expect=SHAPE)
    np.testing.assert_allclose(out, model(x), rtol=1e-6, atol=1e-6)
    assert server.requests[0].headers["Authorization"] == SECRET
    assert server.requests[0].path == "/v2/models/model/versions/1/infer"
    ledger = client.ledger.to_json()
    assert ledger["answered"] == 3 and ledger["failures"] == 0
    assert SECRET not in repr(client) and SECRET not in str(ledger)


def test_batches_are_split_and_sent_concurrently_within_the_limits(
    server: OIPServer, model: LinearModel
) -> None:
    limits = EndpointLimits(max_batch=2, concurrency=2, requests_per_second=1000)
    server.fail(*[Fault.delay(0.15)] * 4)
    x = batch(7)
    with client_for(server, limits=limits) as client:
        out = client.infer(x, images=list(range(7)))
    np.testing.assert_allclose(out, model(x), rtol=1e-6, atol=1e-6)
    assert sorted(r.batch for r in server.requests) == [1, 2, 2, 2]
    assert server.max_in_flight == 2  # in parallel, never above the limit


def test_the_rate_limit_spaces_requests(server: OIPServer) -> None:
    limits = EndpointLimits(requests_per_second=20)
    with client_for(server, limits=limits) as client:
        client.metadata()
        started = time.monotonic()
        for _ in range(6):
            client.infer(batch(1))
        elapsed = time.monotonic() - started
    assert elapsed >= 5 / 20 - 0.01  # six requests: five intervals of 50 ms at least


def test_5xx_timeouts_and_resets_are_retried_and_counted(
    server: OIPServer, model: LinearModel
) -> None:
    limits = EndpointLimits(timeout_seconds=0.3)
    retry = RetryPolicy(attempts=5, backoff_seconds=0.01)
    server.fail(Fault.status_code(503), Fault.delay(1.0), Fault.reset())
    x = batch(2)
    with client_for(server, limits=limits, retry=retry) as client:
        out = client.infer(x, scope=("worst_case", 0.02), images=[4, 5])
    np.testing.assert_allclose(out, model(x), rtol=1e-6, atol=1e-6)
    ledger = client.ledger.to_json()
    assert (ledger["requests"], ledger["failures"], ledger["retries"]) == (5, 3, 3)
    assert ledger["sent"] == 8 and ledger["answered"] == 2  # 4 attempts with inputs × 2
    assert ledger["failures_by_cause"] == {"connection": 1, "http 503": 1, "timeout": 1}
    assert ledger["by_image"] == [
        {"check": "worst_case", "level": 0.02, "image": 4, "answered": 1},
        {"check": "worst_case", "level": 0.02, "image": 5, "answered": 1},
    ]


def test_429_waits_for_retry_after(server: OIPServer) -> None:
    server.fail(Fault.status_code(429, retry_after="1"))
    with client_for(server) as client:
        client.metadata()
        started = time.monotonic()
        client.infer(batch(1))
        assert time.monotonic() - started >= 0.95
    assert client.ledger.to_json()["failures_by_cause"] == {"http 429": 1}


def test_a_retry_after_beyond_the_cap_fails_at_once(server: OIPServer) -> None:
    server.fail(Fault.status_code(429, retry_after="3600"))
    with client_for(server) as client, pytest.raises(EndpointUnavailable, match="3600 s"):
        client.infer(batch(1))


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_exhausted_retries_fail_with_the_last_cause(server: OIPServer) -> None:
    server.fail(*[Fault.status_code(500)] * 3)
    with client_for(server) as client:
        with pytest.raises(EndpointUnavailable, match="failed 3 times; last: answered 500"):
            client.infer(batch(1))
        assert client.ledger.to_json()["answered"] == 0


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault.wrong_shape(), "wrong shape: the output says shape"),
        (Fault.nan(), "non-finite output: 1 of 16 values"),
        (Fault.garbage(), "not JSON"),
        (Fault.status_code(400), "answered 400"),
    ],
)
def test_bad_answers_fail_the_query_without_retries(
    server: OIPServer, fault: Fault, message: str
) -> None:
    server.fail(fault)
    with client_for(server) as client:
        client.metadata()
        with pytest.raises(EndpointAnswerInvalid, match=message):
            client.infer(batch(1))
    assert len(server.requests) == 1
    assert client.ledger.to_json()["failures"] == 1


def test_an_unexpected_output_shape_is_refused(server: OIPServer) -> None:
    refused = pytest.raises(EndpointAnswerInvalid, match=r"expected \[1, 2, 8, 8\]")
    with client_for(server) as client, refused:
        client.infer(batch(1), expect=(2, 8, 8))


def test_redirects_are_not_followed(server: OIPServer) -> None:
    server.fail(Fault.redirect("http://169.254.169.254/latest/meta-data"))
    with client_for(server) as client:
        client.metadata()
        with pytest.raises(EndpointRefused, match="307 to http://169.254.169.254"):
            client.infer(batch(1))
    assert len(server.requests) == 1


def test_the_circuit_opens_after_failures_in_a_row_and_recovers(server: OIPServer) -> None:
    server.fail(*[Fault.status_code(502)] * 3)
    breaker = BreakerPolicy(failures=3, cooldown_seconds=0.3)
    with client_for(
        server, breaker=breaker, retry=RetryPolicy(attempts=5, backoff_seconds=0)
    ) as client:
        client.metadata()
        with pytest.raises(CircuitOpen, match="failed 3 times in a row"):
            client.infer(batch(1))
        with pytest.raises(CircuitOpen):  # fails fast: no request reaches the server
            client.infer(batch(1))
        assert len(server.requests) == 3
        time.sleep(0.35)
        client.infer(batch(1))  # half-open: the trial succeeds and closes it
        assert client.breaker.state == "closed"


def test_egress_refuses_loopback_by_default(server: OIPServer) -> None:
    refused = pytest.raises(EndpointRefused, match="loopback.*TIGHTROPE_ENDPOINT_ALLOW")
    with client_for(server, allow=parse_allow_list("")) as client, refused:
        client.infer(batch(1))
    assert server.requests == []


def test_egress_refuses_internal_names_and_addresses() -> None:
    for url in ("http://localhost:1", "http://169.254.169.254", "http://[::ffff:10.0.0.1]"):
        target = EndpointTarget(url=url, model_name="m")
        refused = pytest.raises(EndpointRefused, match="endpoint queries may not|loopback name")
        with InferenceClient(target, retry=FAST_RETRY) as client, refused:
            client.metadata()


def test_the_secret_is_redacted_from_errors(server: OIPServer) -> None:
    """An endpoint that echoes the header in its refusal does not put it into our messages."""
    server.fail(Fault.echo("X-Api-Key"))
    with client_for(server, auth=("X-Api-Key", "echo-me-42")) as client:
        client.metadata()
        with pytest.raises(EndpointAnswerInvalid, match="answered 401") as caught:
            client.infer(batch(1))
    assert "[secret]" in str(caught.value) and "echo-me-42" not in str(caught.value)


def test_the_budget_stops_queries_before_they_are_sent(server: OIPServer) -> None:
    ledger = QueryLedger(budget=5)
    with client_for(server, ledger=ledger) as client:
        client.infer(batch(4))
        with pytest.raises(QueryBudgetExhausted, match="budget of 5"):
            client.infer(batch(2))
    assert [r.batch for r in server.requests] == [4]


def test_concurrent_callers_share_the_concurrency_limit(server: OIPServer) -> None:
    server.fail(*[Fault.delay(0.1)] * 6)
    limits = EndpointLimits(concurrency=2, requests_per_second=1000)
    with client_for(server, limits=limits) as client:
        client.metadata()
        threads = [threading.Thread(target=client.infer, args=(batch(1),)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(server.requests) == 6 and server.max_in_flight == 2


def test_ledgers_merge_exactly() -> None:
    a, b = QueryLedger(), QueryLedger()
    a.reserve(("worst_case", 0.01), 2)
    a.answered(("worst_case", 0.01), [0, 1], 0.010)
    b.reserve(("worst_case", 0.01), 1)
    b.failed(("worst_case", 0.01), "timeout")
    b.reserve(("worst_case", 0.01), 1)
    b.retried(("worst_case", 0.01))
    b.answered(("worst_case", 0.01), [1], 0.030)
    merged = QueryLedger.merge([a.to_json(), b.to_json()], budget=100)
    assert merged["by_check"] == [
        {
            "check": "worst_case",
            "level": 0.01,
            "sent": 4,
            "answered": 3,
            "requests": 3,
            "failures": 1,
            "retries": 1,
        }
    ]
    assert [row["answered"] for row in merged["by_image"]] == [1, 2]
    assert merged["latency_seconds"]["p50"] == pytest.approx(0.02)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert QueryLedger.merge([merged]) == {**merged, "budget": None}
