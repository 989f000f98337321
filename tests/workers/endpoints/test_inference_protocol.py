"""The Open Inference Protocol client (workers.shared.inference_protocol) against the
project's own fault-injecting endpoint (tests/fixtures/oip_server.py), over real sockets."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
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
    _output,
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
@pytest.mark.parametrize("binary", ["never", "always"])  # auto would take a 400 for a refusal
def test_bad_answers_fail_the_query_without_retries(
    server: OIPServer, fault: Fault, message: str, binary: str
) -> None:
    server.fail(fault)
    with client_for(server, binary=binary) as client:
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


# -- the binary tensor data extension ---------------------------------------------------------


def test_binary_answers_equal_json_answers_bit_for_bit(
    server: OIPServer, model: LinearModel
) -> None:
    """The same inputs through binary and JSON tensors: the same float32 bits, the model's."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, *SHAPE)) * 10.0 ** rng.integers(-30, 30, (5, *SHAPE))
    x = x.astype(np.float32)
    answers = {}
    for mode in ("never", "always", "auto"):
        with client_for(server, binary=mode) as client:
            answers[mode] = client.infer(x, expect=SHAPE)
            assert client.encoding == ("json" if mode == "never" else "binary")
    expected = model(x)
    for out in answers.values():
        assert out.dtype == np.float32 and out.tobytes() == expected.tobytes()
    assert [seen.binary for seen in server.requests] == [False, True, True]
    binary_headers = server.requests[1].headers
    assert binary_headers["Content-Length"] == str(
        int(binary_headers["Inference-Header-Content-Length"]) + x.nbytes
    )


def test_binary_requests_name_the_output_or_ask_for_every_output(server: OIPServer) -> None:
    """An output named in the target is asked for as binary; the only one, by the request's
    `binary_data_output`."""
    target = EndpointTarget(
        url=server.url, model_name=server.name, input_name="input", output_name="output"
    )
    with InferenceClient(target, allow=LOOPBACK, binary="always") as named:
        named.infer(batch(1))
    with client_for(server, binary="always") as only:
        only.infer(batch(1))
    assert [seen.binary for seen in server.requests] == [True, True]
    assert named.encoding == only.encoding == "binary"


def test_auto_falls_back_to_json_on_a_server_without_the_extension(model: LinearModel) -> None:
    """The negotiation's refusal (400) is not an endpoint failure: a breaker that opens at the
    first failure stays closed. It is a request whose inputs were sent, so the ledger charges
    them; every later request is JSON."""
    limits = EndpointLimits(max_batch=2, concurrency=3, requests_per_second=1000)
    with OIPServer(model, SHAPE, SHAPE, binary=False) as plain:
        with client_for(plain, limits=limits, breaker=BreakerPolicy(failures=1)) as client:
            assert client.encoding is None
            x = batch(7)
            np.testing.assert_allclose(client.infer(x), model(x), rtol=1e-6, atol=1e-6)
            assert client.encoding == "json" and client.breaker.state == "closed"
            ledger = client.ledger.to_json()
            # the metadata, the refused binary part (2 inputs), then 4 JSON parts: 2, 2, 2, 1
            assert (ledger["requests"], ledger["sent"], ledger["answered"]) == (6, 9, 7)
            assert (ledger["failures"], ledger["retries"], ledger["failures_by_cause"]) == (
                0,
                0,
                {},
            )
            client.infer(batch(3))
            assert client.ledger.to_json()["sent"] == 12  # no second negotiation
        assert [seen.binary for seen in plain.requests] == [False] * 6  # the refused one unread


@pytest.mark.parametrize("status", [415, 422])
def test_auto_falls_back_on_415_and_422(server: OIPServer, status: int) -> None:
    server.fail(Fault.status_code(status))
    with client_for(server) as client:
        client.infer(batch(1))
        client.infer(batch(1))
        assert client.encoding == "json"
    assert [seen.binary for seen in server.requests] == [True, False, False]


def test_other_failures_do_not_decide_the_negotiation(server: OIPServer) -> None:
    """A 503 is retried in binary; a 401 fails the query and leaves the negotiation open."""
    server.fail(Fault.status_code(503))
    with client_for(server) as client:
        client.infer(batch(1))  # 503, then a binary answer
        assert client.encoding == "binary"
    server.fail(Fault.status_code(401))
    with client_for(server) as client:
        with pytest.raises(EndpointAnswerInvalid, match="answered 401"):
            client.infer(batch(1))
        assert client.encoding is None
        client.infer(batch(1))
        assert client.encoding == "binary"
    assert [seen.binary for seen in server.requests] == [True] * 4


def test_a_json_answer_is_accepted_and_auto_then_sends_json(model: LinearModel) -> None:
    """A server that reads binary requests but answers JSON: its answer is used (no second
    request), later requests are JSON; `always` keeps sending binary and accepts JSON."""
    with OIPServer(model, SHAPE, SHAPE, binary_answers=False) as ignoring:
        x = batch(2)
        with client_for(ignoring) as client:
            np.testing.assert_allclose(client.infer(x), model(x), rtol=1e-6, atol=1e-6)
            assert client.encoding == "json"
            client.infer(x)
            assert client.ledger.to_json()["sent"] == 4
        with client_for(ignoring, binary="always") as client:
            assert client.infer(x).tobytes() == model(x).tobytes()
        assert [seen.binary for seen in ignoring.requests] == [True, False, True]


def test_never_sends_json_only(server: OIPServer) -> None:
    with client_for(server, binary="never") as client:
        client.infer(batch(2))
        client.infer(batch(2))
    assert [seen.binary for seen in server.requests] == [False, False]
    assert "Inference-Header-Content-Length" not in server.requests[0].headers


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault.truncated(), "binary answer is truncated: its outputs declare 64 bytes"),
        (Fault.oversized(), "binary answer is oversized: the body holds 68 bytes"),
    ],
)
def test_a_truncated_or_oversized_binary_answer_is_refused(
    server: OIPServer, fault: Fault, message: str
) -> None:
    server.fail(fault)
    with client_for(server) as client:
        client.metadata()
        with pytest.raises(EndpointAnswerInvalid, match=message):
            client.infer(batch(1))
        assert client.ledger.to_json()["failures_by_cause"] == {"invalid answer": 1}
    assert len(server.requests) == 1  # not retried


def test_a_binary_answer_over_the_cap_is_refused(
    server: OIPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with client_for(server, binary="always") as client:
        client.metadata()
        monkeypatch.setattr("workers.shared.inference_protocol.MAX_ANSWER_BYTES", 100)
        with pytest.raises(EndpointAnswerInvalid, match=r"the answer has \d+ bytes, more than 100"):
            client.infer(batch(2))


def test_a_binary_data_size_that_does_not_fit_the_shape_is_refused(server: OIPServer) -> None:
    server.fail(Fault.wrong_shape())  # one value too few, binary_data_size and body agreeing
    with client_for(server, binary="always") as client:
        client.metadata()
        refused = pytest.raises(
            EndpointAnswerInvalid,
            match=r"wrong shape: .* shape \[1, 1, 4, 4\] of FP32 \(64 bytes\) but "
            r"binary_data_size is 60",
        )
        with refused:
            client.infer(batch(1))
        assert client.ledger.to_json()["failures_by_cause"] == {"wrong shape": 1}


def test_binary_answers_are_checked_like_json_ones(server: OIPServer) -> None:
    server.fail(Fault.nan())
    with client_for(server, binary="always") as client:
        with pytest.raises(EndpointAnswerInvalid, match="non-finite output: 1 of 16"):
            client.infer(batch(1))
        with pytest.raises(EndpointAnswerInvalid, match=r"expected \[1, 2, 8, 8\]"):
            client.infer(batch(1), expect=(2, 8, 8))
        with pytest.raises(ValueError, match="finite inputs"):
            client.infer(np.full((1, *SHAPE), np.inf, dtype=np.float32))


def _binary_answer(header: bytes, tail: bytes, length: str | None = None) -> httpx.Response:
    declared = str(len(header)) if length is None else length
    return httpx.Response(
        200, headers={"Inference-Header-Content-Length": declared}, content=header + tail
    )


def _redact(text: str) -> str:
    return text.replace("s3cr3t", "[secret]")


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            _binary_answer(b'{"outputs": []}', b"", "999"),
            "its Inference-Header-Content-Length is 999",
        ),
        (_binary_answer(b'{"outputs": []}', b"", "ten"), "is not a length"),
        (
            _binary_answer(b"<html>s3cr3t</html>", b"\0" * 8),
            "header is not JSON: '<html>\\[secret\\]",
        ),
        (
            _binary_answer(
                b'{"outputs": [{"name": "o", "datatype": "FP32", "shape": [1, 2], '
                b'"parameters": {"binary_data_size": -8}}]}',
                b"",
            ),
            "binary_data_size -8 is not a byte count",
        ),
        (
            httpx.Response(
                200,
                json={
                    "outputs": [
                        {
                            "name": "o",
                            "datatype": "FP32",
                            "shape": [1, 2],
                            "parameters": {"binary_data_size": 8},
                        }
                    ]
                },
            ),
            "binary data \\(8 bytes\\) but the answer has no Inference-Header-Content-Length",
        ),
    ],
)
def test_malformed_binary_answers_are_refused(response: httpx.Response, message: str) -> None:
    with pytest.raises(EndpointAnswerInvalid, match=message) as caught:
        _output(response, None, 1, None, _redact)
    assert "s3cr3t" not in str(caught.value)


def test_binary_outputs_are_read_in_order_beside_json_ones() -> None:
    """Several outputs: the bytes of the binary ones follow the JSON in the outputs' order."""
    first = np.arange(6, dtype="<f8").reshape(2, 3)
    wanted = np.array([[1.5, -2.0], [3.25, 4.0]], dtype="<f2")
    header = json.dumps(
        {
            "outputs": [
                {
                    "name": "a",
                    "datatype": "FP64",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": 48},
                },
                {"name": "j", "datatype": "INT32", "shape": [2, 1], "data": [1, 2]},
                {
                    "name": "b",
                    "datatype": "FP16",
                    "shape": [2, 2],
                    "parameters": {"binary_data_size": 8},
                },
            ]
        }
    ).encode()
    response = _binary_answer(header, first.tobytes() + wanted.tobytes())
    values, binary = _output(response, "b", 2, (2,), _redact)
    assert binary and values.tolist() == wanted.astype(np.float32).tolist()
    values, binary = _output(response, "j", 2, None, _redact)
    assert not binary and values.tolist() == [[1.0], [2.0]]


@pytest.mark.parametrize("binary", ["auto", "always", "never"])
def test_the_secret_never_appears_in_binary_errors(server: OIPServer, binary: str) -> None:
    """Refusals that echo the secret, in every mode: auto takes the first 400 for a refusal of
    the extension (never shown) and meets the second with its JSON request."""
    server.fail(Fault.echo("X-Api-Key", status=400), Fault.echo("X-Api-Key", status=400))
    messages = []
    with client_for(server, auth=("X-Api-Key", "echo-me-42"), binary=binary) as client:
        for _ in range(2):
            try:
                client.infer(batch(1))
            except EndpointAnswerInvalid as exc:
                messages.append(str(exc))
        if client.encoding == "binary":
            server.fail(Fault.truncated())
            with pytest.raises(EndpointAnswerInvalid, match="truncated") as caught:
                client.infer(batch(1))
            messages.append(str(caught.value))
        text = " ".join(messages) + repr(client) + str(client.ledger.to_json())
    assert "echo-me-42" not in text
    answered_400 = [m for m in messages if "answered 400" in m]
    assert len(answered_400) == (1 if binary == "auto" else 2)
    assert all("[secret]" in m for m in answered_400)


def test_a_refused_negotiation_hands_a_half_open_trial_back(server: OIPServer) -> None:
    """The circuit half-open, its one trial is the binary negotiation, refused: the JSON
    request that follows is the trial, and its success closes the circuit."""
    breaker = BreakerPolicy(failures=1, cooldown_seconds=0.2)
    with client_for(server, breaker=breaker, retry=RetryPolicy(attempts=1)) as client:
        client.metadata()
        server.fail(Fault.status_code(502))
        with pytest.raises(EndpointUnavailable, match="answered 502"):
            client.infer(batch(1))
        assert client.breaker.state == "open" and client.encoding is None
        time.sleep(0.25)
        server.fail(Fault.status_code(400))
        client.infer(batch(1))
        assert client.breaker.state == "closed" and client.encoding == "json"
    assert [seen.binary for seen in server.requests] == [True, True, False]
