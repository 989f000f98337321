"""A client of the Open Inference Protocol (the KServe v2 REST protocol that Triton, KServe,
MLServer and TorchServe speak), for auditing a model through its endpoint (docs/models.md,
"Endpoint models"; docs/security.md, "Endpoints").

What it speaks: `GET /v2/models/{name}[/versions/{v}]` (metadata), `.../ready`, and
`POST .../infer` with JSON tensors (`FP32` data, its shape and datatype; an answer's tensor may
be any numeric datatype, its data flat or nested), or with the protocol's **binary tensor data
extension** where the server offers it (Triton's and KServe's: a JSON header, then the
tensors' raw little-endian bytes; `Inference-Header-Content-Length` names the header's length,
`parameters.binary_data_size` each tensor's bytes). The client's `binary` setting: `"auto"`
(the default) tries binary on the first infer request and falls back to JSON for the client's
life when the server refuses it (400, 415, 422) or answers plain JSON; `"always"` and
`"never"` do not negotiate. A JSON answer is accepted in every mode. What it holds to, per
client (one per audit step):

- **limits** (`schemas.endpoints.EndpointLimits`): inputs per request (larger batches are
  split, the parts sent concurrently), requests per second (evenly spaced, no bursts), requests
  in flight, and a time limit per request;
- **retries**: a time-out, a reset or refused connection, 408, 429 and 5xx are tried again, up
  to `RetryPolicy.attempts` attempts, after an exponential backoff (`backoff_seconds` · 2^k,
  capped; no jitter, so a run is reproducible), or after the `Retry-After` a 429 or 503 names
  (a wait longer than `max_retry_after_seconds` is not waited for: the query fails). Redirects
  are never followed (a 3xx fails the query), other 4xx answers fail it at once;
- **a circuit breaker**: `BreakerPolicy.failures` failed attempts in a row open it; while open
  every query fails at once, without a request; after `cooldown_seconds` one trial request is
  let through (half-open), whose success closes it;
- **answers**: the output tensor must have the batch's size and, when the caller names one,
  the shape it expects, and only finite values; anything else fails the query (never retried:
  the same input gets the same wrong answer), so a broken answer never reads as stability;
- **egress**: the destination is checked with the callbacks' rules (schemas.callback_targets:
  loopback, private, link-local, metadata and other internal addresses are refused unless the
  deployment's `TIGHTROPE_ENDPOINT_ALLOW` names them), the host resolved once, and every
  request sent to that checked address (the `Host` header and TLS name stay the URL's host), so
  a DNS answer that changes later cannot steer a query inside. The environment's proxies are
  not used;
- **the ledger** (workers.shared.query_ledger): every attempt, answer, failure, retry and
  latency, per check, level and image, and the audit's query budget.

The auth header's secret is sent on every request and appears nowhere else: not in `repr`,
not in an error's message (an answer that echoes it is redacted), not in the ledger.

Torch-free (numpy, httpx, schemas): the admission step, the engine's endpoint model and the
tests use it.
"""

from __future__ import annotations

import email.utils
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx
import numpy as np

from schemas.callback_targets import (
    AllowList,
    CallbackHostUnresolved,
    CallbackTargetRefused,
    Target,
    check_target,
)
from schemas.endpoints import EndpointLimits, EndpointTarget
from workers.shared.query_ledger import QueryLedger, Scope

ALLOW_SETTING = "TIGHTROPE_ENDPOINT_ALLOW"
USER_AGENT = "tightrope-audit/1"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# numeric datatypes of the protocol an answer may carry (BYTES is not numeric)
NUMERIC_DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
MAX_ANSWER_BYTES = 512 * 1024 * 1024
_EXCERPT = 200
# the binary tensor data extension: the JSON header's length, in requests and answers
HEADER_LENGTH = "Inference-Header-Content-Length"
# answers to a binary request that say the server does not read the extension (auto falls back)
BINARY_REFUSALS = frozenset({400, 415, 422})
Binary = Literal["auto", "always", "never"]


class EndpointError(Exception):
    """A query failed; the message says why, for a person (never with the secret)."""

    cause = "error"


class EndpointRefused(EndpointError):
    """The destination is not allowed (egress rules), or the endpoint redirects."""

    cause = "refused"


class EndpointUnavailable(EndpointError):
    """Every attempt failed (time-outs, resets, 5xx, 429), or the circuit is open."""

    cause = "unavailable"


class CircuitOpen(EndpointUnavailable):
    cause = "circuit open"


class EndpointAnswerInvalid(EndpointError):
    """The endpoint answered, but not a usable answer: a refusal (4xx), not the protocol's
    JSON, a wrong shape, non-finite values."""

    cause = "invalid answer"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # per request, the first included
    backoff_seconds: float = 0.5  # before the first retry; doubled before each next
    max_backoff_seconds: float = 30.0
    max_retry_after_seconds: float = 120.0  # a longer Retry-After fails the query

    def backoff(self, retries_done: int) -> float:
        return float(min(self.backoff_seconds * 2**retries_done, self.max_backoff_seconds))


@dataclass(frozen=True)
class BreakerPolicy:
    failures: int = 8  # failed attempts in a row that open the circuit
    cooldown_seconds: float = 30.0


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: variable (the batch)


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


class RateLimiter:
    """Requests evenly spaced at 1/rate seconds: each caller gets the next free slot."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / rate
        self._clock = clock
        self._next = -math.inf
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            time.sleep(slot - now)


class CircuitBreaker:
    """closed → (failures in a row) → open → (cooldown) → half-open: one trial → closed/open."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic):
        self._policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        self.last_cause = ""

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half-open" if self._trial else "open"

    def before(self) -> None:
        """Raise CircuitOpen unless a request may go now."""
        with self._lock:
            if self._opened_at is None:
                return
            waited = self._clock() - self._opened_at
            if waited >= self._policy.cooldown_seconds and not self._trial:
                self._trial = True  # half-open: this caller's request is the trial
                return
            left = max(0.0, self._policy.cooldown_seconds - waited)
            raise CircuitOpen(
                f"the endpoint failed {self._failures} times in a row (last: {self.last_cause}); "
                f"no query is sent for {left:.0f} s more"
            )

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial = False

    def failed(self, cause: str) -> None:
        with self._lock:
            self._failures += 1
            self.last_cause = cause
            if self._trial or self._failures >= self._policy.failures:
                self._opened_at = self._clock()
                self._trial = False

    def abstain(self) -> None:
        """An attempt that says nothing of the endpoint's health (the binary negotiation's
        refusal): neither a failure nor a success; a half-open trial is handed back."""
        with self._lock:
            self._trial = False


class _BinaryUnsupported(Exception):
    """The binary negotiation's request was refused (400, 415, 422) or answered without the
    output's data: the server does not read the extension; the request goes again as JSON."""


class _NoData(EndpointAnswerInvalid):
    """The answer's output tensor carries neither `data` nor binary data."""


class _Retry(Exception):
    """One attempt failed in a way worth another: `cause` for the ledger, `wait` if the
    endpoint named one (Retry-After)."""

    def __init__(self, cause: str, detail: str, wait: float | None = None) -> None:
        super().__init__(detail)
        self.cause = cause
        self.wait = wait


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header's wait: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


class InferenceClient:
    """One endpoint's client; thread-safe. Close it (or use it as a context manager)."""

    def __init__(
        self,
        target: EndpointTarget,
        *,
        limits: EndpointLimits | None = None,
        auth: tuple[str, str] | None = None,
        allow: AllowList | None = None,
        ledger: QueryLedger | None = None,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        resolve_timeout: float = 5.0,
        binary: Binary = "auto",
    ) -> None:
        if binary not in ("auto", "always", "never"):
            raise ValueError(f"binary is 'auto', 'always' or 'never', not {binary!r}")
        self.target = target
        self.binary = binary
        self.limits = limits or EndpointLimits()
        self.ledger = ledger if ledger is not None else QueryLedger()
        self.retry = retry or RetryPolicy()
        self.breaker = CircuitBreaker(breaker or BreakerPolicy())
        self._auth = auth
        self._allow = allow or AllowList()
        self._resolve_timeout = resolve_timeout
        self._rate = RateLimiter(self.limits.requests_per_second)
        self._in_flight = threading.BoundedSemaphore(self.limits.concurrency)
        self._pinned: Target | None = None
        self._pin_lock = threading.Lock()
        self._http = httpx.Client(
            follow_redirects=False,
            trust_env=False,
            timeout=self.limits.timeout_seconds,
            limits=httpx.Limits(max_connections=self.limits.concurrency),
        )
        self._pool = ThreadPoolExecutor(
            max_workers=self.limits.concurrency, thread_name_prefix="endpoint"
        )
        self._metadata: ModelMetadata | None = None
        # the infer requests' encoding: None until auto's negotiation has decided
        self._encoding: str | None = {"auto": None, "always": "binary", "never": "json"}[binary]
        self._negotiation = threading.Lock()

    @property
    def encoding(self) -> str | None:
        """How infer requests are sent: "binary", "json", or None while `binary="auto"` has not
        negotiated yet."""
        return self._encoding

    def __repr__(self) -> str:  # never the secret
        header = None if self._auth is None else self._auth[0]
        return (
            f"InferenceClient({self.target.url!r}, model={self.target.model_name!r}, "
            f"version={self.target.model_version!r}, auth_header={header!r})"
        )

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    # -- the protocol ----------------------------------------------------------------------

    def _model_path(self) -> str:
        path = f"/v2/models/{quote(self.target.model_name, safe='')}"
        if self.target.model_version is not None:
            path += f"/versions/{quote(self.target.model_version, safe='')}"
        return path

    def metadata(self) -> ModelMetadata:
        """The model's metadata (name, versions, platform, its input and output tensors)."""
        response = self._request("GET", self._model_path(), None, ("metadata", None), [])
        body = _json(response, self._redact)
        try:
            found = ModelMetadata(
                name=str(body["name"]),
                versions=tuple(str(v) for v in body.get("versions") or ()),
                platform=str(body.get("platform", "")),
                inputs=tuple(_tensor_info(t) for t in body.get("inputs") or ()),
                outputs=tuple(_tensor_info(t) for t in body.get("outputs") or ()),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EndpointAnswerInvalid(
                f"the model's metadata is not the protocol's: {type(exc).__name__}: {exc}"
            ) from None
        self._metadata = found
        return found

    def ready(self) -> bool:
        """Whether the model says it is ready (one request, no retries)."""
        self.breaker.before()
        try:
            response = self._send("GET", self._model_path() + "/ready", None)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _tensor_names(self) -> tuple[str, str | None]:
        name, output = self.target.input_name, self.target.output_name
        if name is None:
            meta = self._metadata if self._metadata is not None else self.metadata()
            if len(meta.inputs) != 1:
                raise EndpointAnswerInvalid(
                    f"the model has {len(meta.inputs)} inputs: name the one to audit (`input_name`)"
                )
            name = meta.inputs[0].name
            if output is None and len(meta.outputs) > 1:
                raise EndpointAnswerInvalid(
                    f"the model has {len(meta.outputs)} outputs: name the one to audit "
                    "(`output_name`)"
                )
        return name, output

    def infer(
        self,
        inputs: np.ndarray,
        *,
        scope: Scope = ("probe", None),
        images: Sequence[int | None] | None = None,
        expect: Sequence[int] | None = None,
    ) -> np.ndarray:
        """The model's outputs for a batch of inputs [B, ...] (float32), split into requests of
        at most `max_batch` inputs sent concurrently. `images` name the image of each input
        for the ledger; `expect` is the shape of one output, checked. Raises EndpointError
        (or QueryBudgetExhausted) if any part fails."""
        batch = np.ascontiguousarray(inputs, dtype=np.float32)
        if batch.ndim < 1 or batch.shape[0] == 0:
            raise ValueError("infer needs a batch of at least one input")
        if not np.isfinite(batch).all():
            raise ValueError("infer needs finite inputs (JSON has no NaN or infinity)")
        owners: list[int | None] = list(images) if images is not None else [None] * len(batch)
        if len(owners) != len(batch):
            raise ValueError("one image per input")
        name, output = self._tensor_names()
        size = self.limits.max_batch
        starts = list(range(0, len(batch), size))
        parts = [
            (batch[s : s + size], owners[s : s + size]) for s in starts
        ]  # (inputs, their images)
        if len(parts) == 1:
            answers = [self._infer_part(parts[0][0], parts[0][1], name, output, scope, expect)]
        else:
            futures = [
                self._pool.submit(self._infer_part, part, who, name, output, scope, expect)
                for part, who in parts
            ]
            answers = [f.result() for f in futures]
        return np.concatenate(answers)

    def _infer_part(
        self,
        part: np.ndarray,
        owners: list[int | None],
        name: str,
        output: str | None,
        scope: Scope,
        expect: Sequence[int] | None,
    ) -> np.ndarray:
        if self._encoding is None:
            with self._negotiation:  # one request negotiates; the others wait for its answer
                if self._encoding is None:
                    return self._negotiate(part, owners, name, output, scope, expect)
        values, _ = self._send_part(
            part, owners, name, output, scope, expect, binary=self._encoding == "binary"
        )
        return values

    def _negotiate(
        self,
        part: np.ndarray,
        owners: list[int | None],
        name: str,
        output: str | None,
        scope: Scope,
        expect: Sequence[int] | None,
    ) -> np.ndarray:
        """Auto's first infer request: binary; a refusal or an answer without the binary data
        decides JSON for the client's life (the refused request is in the ledger: its inputs
        were sent; the breaker does not count it), a binary answer decides binary."""
        try:
            values, binary = self._send_part(
                part, owners, name, output, scope, expect, binary=True, negotiating=True
            )
        except _BinaryUnsupported:
            self._encoding = "json"
            values, _ = self._send_part(part, owners, name, output, scope, expect, binary=False)
            return values
        self._encoding = "binary" if binary else "json"
        return values

    def _send_part(
        self,
        part: np.ndarray,
        owners: list[int | None],
        name: str,
        output: str | None,
        scope: Scope,
        expect: Sequence[int] | None,
        *,
        binary: bool,
        negotiating: bool = False,
    ) -> tuple[np.ndarray, bool]:
        """One request's outputs, and whether they came as binary data."""
        tensor: dict[str, Any] = {"name": name, "shape": list(part.shape), "datatype": "FP32"}
        body: dict[str, Any] = {"inputs": [tensor]}
        headers: dict[str, str] = {}
        raw = b""
        if binary:
            raw = np.ascontiguousarray(part, dtype="<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            if output is not None:
                body["outputs"] = [{"name": output, "parameters": {"binary_data": True}}]
            else:  # the only output, its name unknown: every output as binary data
                body["parameters"] = {"binary_data_output": True}
        else:
            tensor["data"] = part.ravel().tolist()
            if output is not None:
                body["outputs"] = [{"name": output}]
        content = json.dumps(body, allow_nan=False).encode("utf-8")
        if binary:
            headers[HEADER_LENGTH] = str(len(content))
            content += raw

        def check(response: httpx.Response) -> tuple[np.ndarray, bool]:
            try:
                return _output(response, output, len(part), expect, self._redact)
            except _NoData:
                if negotiating:
                    raise _BinaryUnsupported("the answer has no data for the output") from None
                raise

        result: tuple[np.ndarray, bool] = self._request(
            "POST",
            self._model_path() + "/infer",
            content,
            scope,
            owners,
            answer=check,
            headers=headers,
            negotiating=negotiating,
        )
        return result

    # -- sending ---------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        content: bytes | None,
        scope: Scope,
        owners: list[int | None],
        answer: Callable[[httpx.Response], Any] | None = None,
        headers: dict[str, str] | None = None,
        negotiating: bool = False,
    ) -> Any:
        """Send with the limits, retries, breaker and ledger; return `answer(response)` (or the
        response) for a 200. `negotiating`: a refusal of the binary extension raises
        _BinaryUnsupported (charged to the ledger as sent, not to the breaker)."""
        policy = self.retry
        for attempt in range(policy.attempts):
            self.breaker.before()
            self.ledger.reserve(scope, len(owners))
            if attempt:
                self.ledger.retried(scope)
            self._rate.wait()
            started = time.monotonic()
            try:
                with self._in_flight:
                    response = self._classified(method, path, content, headers, negotiating)
                result = answer(response) if answer is not None else response
            except _BinaryUnsupported:
                self.breaker.abstain()
                raise
            except _Retry as failure:
                self.ledger.failed(scope, failure.cause)
                self.breaker.failed(failure.cause)
                if attempt + 1 == policy.attempts:
                    raise EndpointUnavailable(
                        f"{method} {self._where(path)} failed {policy.attempts} times; last: "
                        f"{failure}"
                    ) from None
                wait = failure.wait if failure.wait is not None else policy.backoff(attempt)
                if wait > policy.max_retry_after_seconds:
                    raise EndpointUnavailable(
                        f"{method} {self._where(path)}: {failure}; the endpoint asks to wait "
                        f"{wait:g} s, more than {policy.max_retry_after_seconds:g} s"
                    ) from None
                time.sleep(wait)
                continue
            except EndpointError as exc:
                self.ledger.failed(scope, _cause_of(exc))
                self.breaker.failed(exc.cause)
                raise
            self.breaker.succeeded()
            self.ledger.answered(scope, owners, time.monotonic() - started)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _where(self, path: str) -> str:
        return f"{self.target.url}{path}"

    def _classified(
        self,
        method: str,
        path: str,
        content: bytes | None,
        headers: dict[str, str] | None = None,
        negotiating: bool = False,
    ) -> httpx.Response:
        """One attempt: the 200 response, else _Retry, _BinaryUnsupported (`negotiating`) or a
        final EndpointError."""
        try:
            response = self._send(method, path, content, headers)
        except httpx.TimeoutException:
            raise _Retry("timeout", f"no answer within {self.limits.timeout_seconds:g} s") from None
        except httpx.TransportError as exc:
            raise _Retry("connection", f"{type(exc).__name__}: {self._redact(str(exc))}") from None
        code = response.status_code
        if code == 200:
            return response
        excerpt = self._redact(response.text[:_EXCERPT])
        if negotiating and code in BINARY_REFUSALS:
            raise _BinaryUnsupported(f"answered {code}: {excerpt}")
        if code in RETRYABLE_STATUS:
            wait = retry_after_seconds(response.headers.get("retry-after"))
            raise _Retry(f"http {code}", f"answered {code}: {excerpt}", wait)
        if 300 <= code < 400:
            where = self._redact(response.headers.get("location", "?"))
            raise EndpointRefused(
                f"{method} {self._where(path)} answered {code} to {where}: redirects are not "
                "followed"
            )
        raise EndpointAnswerInvalid(f"{method} {self._where(path)} answered {code}: {excerpt}")

    def _target(self) -> Target:
        with self._pin_lock:
            if self._pinned is None:
                try:
                    self._pinned = check_target(
                        self.target.url,
                        self._allow,
                        timeout=self._resolve_timeout,
                        purpose="endpoint queries",
                        setting=ALLOW_SETTING,
                    )
                except CallbackHostUnresolved as exc:
                    raise _Retry("unresolved", str(exc)) from None
                except CallbackTargetRefused as exc:
                    raise EndpointRefused(
                        f"the endpoint {self.target.url} is refused: {exc}"
                    ) from None
            return self._pinned

    def _send(
        self,
        method: str,
        path: str,
        content: bytes | None,
        extra: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One HTTP request to the checked (pinned) address."""
        pinned = self._target()
        url = httpx.URL(self.target.url + path)
        headers = {"Host": url.netloc.decode("ascii"), "User-Agent": USER_AGENT}
        if content is not None:
            # a binary body too: it starts with its JSON header, and a server without the
            # extension then fails to read it as JSON (MLServer: 422), where an octet-stream
            # body can make it fail otherwise (MLServer 1.7: a 500, which would be retried)
            headers["Content-Type"] = "application/json"
        headers.update(extra or {})
        if self._auth is not None:
            headers[self._auth[0]] = self._auth[1]
        extensions = {"sni_hostname": pinned.host} if pinned.scheme == "https" else {}
        failure: httpx.ConnectError | None = None
        for address in pinned.addresses:
            try:
                response = self._http.request(
                    method,
                    url.copy_with(host=str(address)),
                    content=content,
                    headers=headers,
                    extensions=extensions,
                )
            except httpx.ConnectError as exc:
                failure = exc
                continue
            if len(response.content) > MAX_ANSWER_BYTES:
                raise EndpointAnswerInvalid(
                    f"the answer has {len(response.content)} bytes, more than {MAX_ANSWER_BYTES}"
                )
            return response
        assert failure is not None
        raise failure

    def _redact(self, text: str) -> str:
        if self._auth is not None and self._auth[1]:
            text = text.replace(self._auth[1], "[secret]")
        return text


def _cause_of(exc: EndpointError) -> str:
    text = str(exc)
    for cause in ("wrong shape", "non-finite"):
        if cause in text:
            return cause
    return exc.cause


def _tensor_info(raw: Any) -> TensorInfo:
    return TensorInfo(
        name=str(raw["name"]),
        datatype=str(raw["datatype"]),
        shape=tuple(int(d) for d in raw["shape"]),
    )


def _json(response: httpx.Response, redact: Callable[[str], str]) -> Any:
    try:
        return response.json()
    except ValueError:
        raise EndpointAnswerInvalid(
            f"the answer is not JSON: {redact(response.text[:_EXCERPT])!r}"
        ) from None


def _output(
    response: httpx.Response,
    name: str | None,
    batch: int,
    expect: Sequence[int] | None,
    redact: Callable[[str], str],
) -> tuple[np.ndarray, bool]:
    """The answer's output tensor as float32 [batch, ...], and whether it came as binary data;
    EndpointAnswerInvalid otherwise."""
    body, tail = _answer_parts(response, redact)
    outputs = body.get("outputs") if isinstance(body, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise EndpointAnswerInvalid("the answer has no `outputs`")
    if name is None:
        if len(outputs) != 1:
            raise EndpointAnswerInvalid(f"the answer has {len(outputs)} outputs: name one")
        index = 0
    else:
        found = [i for i, t in enumerate(outputs) if isinstance(t, dict) and t.get("name") == name]
        if not found:
            raise EndpointAnswerInvalid(f"the answer has no output {name!r}")
        index = found[0]
    sizes = [_binary_size(t) for t in outputs]
    tensor = outputs[index]
    try:
        datatype = str(tensor["datatype"])
        shape = [int(d) for d in tensor["shape"]]
    except (KeyError, TypeError, ValueError):
        raise EndpointAnswerInvalid("an output tensor needs `datatype` and `shape`") from None
    if datatype not in NUMERIC_DATATYPES or datatype == "BOOL":
        raise EndpointAnswerInvalid(f"the output's datatype {datatype} is not a number type")
    if any(d < 0 for d in shape):
        raise EndpointAnswerInvalid(f"wrong shape: the output says shape {shape}")
    if tail is None and sizes[index] is not None:
        raise EndpointAnswerInvalid(
            f"the output says it is binary data ({sizes[index]} bytes) but the answer has no "
            f"{HEADER_LENGTH} header"
        )
    if tail is not None:
        declared = sum(size for size in sizes if size is not None)
        if declared > len(tail):
            raise EndpointAnswerInvalid(
                f"the binary answer is truncated: its outputs declare {declared} bytes of "
                f"binary data, the body holds {len(tail)} after the JSON header"
            )
        if declared < len(tail):
            raise EndpointAnswerInvalid(
                f"the binary answer is oversized: the body holds {len(tail)} bytes after the "
                f"JSON header, its outputs declare {declared}"
            )
    size = sizes[index]
    if tail is not None and size is not None:
        dtype = np.dtype(NUMERIC_DATATYPES[datatype]).newbyteorder("<")
        if size != math.prod(shape) * dtype.itemsize:
            raise EndpointAnswerInvalid(
                f"wrong shape: the output says shape {shape} of {datatype} "
                f"({math.prod(shape) * dtype.itemsize} bytes) but binary_data_size is {size}"
            )
        offset = sum(s for s in sizes[:index] if s is not None)
        values = np.frombuffer(tail, dtype=dtype, count=math.prod(shape), offset=offset)
        return _checked(values.astype(np.float64), shape, batch, expect), True
    if "data" not in tensor:
        raise _NoData(
            "an output tensor needs `data`, or binary data (`parameters.binary_data_size` and "
            f"the {HEADER_LENGTH} header)"
        )
    try:
        values = np.asarray(tensor["data"], dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise EndpointAnswerInvalid("the output's data is not a list of numbers") from None
    if math.prod(shape) != values.size:
        raise EndpointAnswerInvalid(
            f"wrong shape: the output says shape {shape} but holds {values.size} values"
        )
    return _checked(values, shape, batch, expect), False


def _checked(
    values: np.ndarray, shape: list[int], batch: int, expect: Sequence[int] | None
) -> np.ndarray:
    """The output's values (float64, flat, as many as `shape` holds) as float32 [batch, ...],
    if the shape is the batch's and the one expected and every value is finite."""
    wanted = [batch, *expect] if expect is not None else None
    if not shape or shape[0] != batch or (wanted is not None and shape != wanted):
        expected = wanted if wanted is not None else f"[{batch}, ...]"
        raise EndpointAnswerInvalid(f"wrong shape: expected {expected}, the endpoint gave {shape}")
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise EndpointAnswerInvalid(
            f"non-finite output: {bad} of {values.size} values are NaN or infinite"
        )
    return values.reshape(shape).astype(np.float32)


def _answer_parts(
    response: httpx.Response, redact: Callable[[str], str]
) -> tuple[Any, bytes | None]:
    """The answer's JSON, and the bytes after it where the answer is binary (its
    `Inference-Header-Content-Length` header names the JSON's length), else None."""
    raw = response.headers.get(HEADER_LENGTH)
    if raw is None:
        return _json(response, redact), None
    content = response.content
    text = raw.strip()
    if not text.isdigit():
        raise EndpointAnswerInvalid(
            f"the answer's {HEADER_LENGTH} is not a length: {redact(text[:_EXCERPT])!r}"
        )
    length = int(text)
    if not 0 < length <= len(content):
        raise EndpointAnswerInvalid(
            f"the binary answer is truncated: its {HEADER_LENGTH} is {length}, the body has "
            f"{len(content)} bytes"
        )
    try:
        body = json.loads(content[:length])
    except ValueError:
        excerpt = content[: min(length, _EXCERPT)].decode("utf-8", "replace")
        raise EndpointAnswerInvalid(
            f"the binary answer's header is not JSON: {redact(excerpt)!r}"
        ) from None
    return body, content[length:]


def _binary_size(tensor: Any) -> int | None:
    """An output's `parameters.binary_data_size` (None: its data is JSON)."""
    parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise EndpointAnswerInvalid(f"an output's binary_data_size {size!r} is not a byte count")
    return size
