"""The runner's half of the query relay: an endpoint model's queries go out through the worker.

Runners have no network (docs/security.md, "Endpoints"), so the engine's EndpointModule is
given this client: each batch is written to `queries/<n>.in.npy` in the job directory, a
`query` event names it (with the check and level it is charged to and the shape each answer
must have), and the runner blocks on stdin until the worker answers with one JSON line:
`{"id": n, "ok": true}` once `queries/<n>.out.npy` holds the answers, or
`{"id": n, "ok": false, "budget_spent": bool, "reason": "..."}`. The worker holds the only
HTTP client (limits, retries, breaker, egress rules), the decrypted secret and the ledger.
numpy only: the engine is not imported here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from schemas.runner import QUERIES_DIR, QUERY_EVENT
from workers.shared.errors import EndpointQueryFailed
from workers.shared.query_ledger import Scope


class Emitter(Protocol):
    def emit(self, event: str, **fields: Any) -> None: ...


class RelayedQueries:
    """A QueryClient (workers.engine.endpoint_model) whose queries the worker answers."""

    def __init__(self, job_dir: Path, events: Emitter, answers: IO[str]) -> None:
        self._dir = job_dir / QUERIES_DIR
        self._dir.mkdir(exist_ok=True)
        self._events = events
        self._answers = answers
        self._next = 0

    def infer(
        self,
        inputs: np.ndarray,
        *,
        scope: Scope = ("audit", None),
        expect: Sequence[int] | None = None,
    ) -> np.ndarray:
        number = self._next
        self._next += 1
        batch = np.ascontiguousarray(inputs, dtype=np.float32)
        sent, answer = self._dir / f"{number}.in.npy", self._dir / f"{number}.out.npy"
        np.save(sent, batch, allow_pickle=False)
        check, level = scope
        info: dict[str, Any] = {"id": number, "check": check, "level": level}
        if expect is not None:
            info["expect"] = [int(d) for d in expect]
        self._events.emit(QUERY_EVENT, file=f"{QUERIES_DIR}/{sent.name}", info=info)
        line = self._answers.readline()
        sent.unlink(missing_ok=True)
        try:
            reply = json.loads(line) if line else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or reply.get("id") != number:
            raise EndpointQueryFailed(
                "the worker did not answer the runner's query (it closed the relay)"
            )
        if not reply.get("ok"):
            raise EndpointQueryFailed(
                str(reply.get("reason") or "the query failed"),
                budget_spent=bool(reply.get("budget_spent")),
            )
        try:
            out = np.load(answer, allow_pickle=False)
        finally:
            answer.unlink(missing_ok=True)
        want = (len(batch), *(expect or out.shape[1:]))
        if out.dtype != np.float32 or tuple(out.shape) != tuple(want):
            raise EndpointQueryFailed(
                f"the relayed answer has shape {list(out.shape)} ({out.dtype}), not {list(want)}"
            )
        return out
