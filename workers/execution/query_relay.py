"""The worker's half of the query relay (workers.sandbox.query_relay is the runner's): answer
an endpoint model's queries for the sandboxed runner, which has no network.

Each runner job (plan, shard, finalise) of an endpoint model's audit gets a relay of its own:
one InferenceClient (the endpoint's limits, retries, breaker and egress rules, the decrypted
secret) and one query ledger, drawing on the audit's shared query budget. The ledger goes with
the job's result (a shard's result, the plan's row), so a shard run again after a worker died
replaces its lost result instead of adding to it: the report counts every query whose answer
it used, once (workers.shared.query_ledger). What the lost attempt sent is not in the ledger
but was drawn from the budget: the report's `queries.drawn` says how much the audit's steps
drew in all (at least `sent`; the difference is what lost attempts sent or held).

The budget: the audit's (`budget.queries`, else the deployment's `endpoint_query_budget`),
shared by all its steps wherever they run (workers.execution.query_budget).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.audits import AuditRequest
from schemas.endpoints import ENDPOINT_FORMAT, EndpointView
from schemas.runner import QUERIES_DIR, RunnerEvent
from service.db.tables import Audit, AuditShard, Model
from service.settings import Settings
from workers.execution.endpoint_admission import client_for
from workers.execution.query_budget import AuditQueryBudget
from workers.shared.inference_protocol import EndpointError, InferenceClient
from workers.shared.query_ledger import QueryBudgetExhausted, QueryLedger

log = logging.getLogger(__name__)

QUERY_FILE = re.compile(r"^(\d{1,12})\.in\.npy$")
# The largest batch file a runner may hand the worker (a float32 batch of 64 Mi values).
MAX_QUERY_BYTES = 256 * 1024 * 1024
MAX_SCOPE_NAME = 64


class QueryRelay:
    """Answers one runner job's queries (workers.sandbox.child.QueryAnswerer)."""

    def __init__(self, client: InferenceClient, pool: AuditQueryBudget | None = None) -> None:
        self.client = client
        self._pool = pool

    @property
    def ledger(self) -> QueryLedger:
        return self.client.ledger

    def settle(self) -> None:
        """Give back to the audit's budget what the job drew and did not send."""
        if self._pool is not None:
            unsent, self.ledger.granted = self.ledger.granted, 0
            self._pool.give_back(unsent)

    def close(self) -> None:
        self.client.close()
        self.settle()

    def __enter__(self) -> QueryRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answer(self, event: RunnerEvent, job_dir: Path) -> bytes:
        info = event.info or {}
        number = info.get("id")
        try:
            batch, scope, expect = _read_query(event, job_dir)
            out = self.client.infer(batch, scope=scope, expect=expect)
            answer = job_dir / QUERIES_DIR / f"{number}.out.npy"
            tmp = answer.with_suffix(".tmp")
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(out, dtype=np.float32), allow_pickle=False)
            tmp.replace(answer)
            reply: dict[str, Any] = {"id": number, "ok": True}
        except QueryBudgetExhausted as exc:
            reply = {"id": number, "ok": False, "budget_spent": True, "reason": str(exc)}
        except (EndpointError, _BadQuery) as exc:
            reply = {"id": number, "ok": False, "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the runner must always get an answer
            log.exception("the worker could not answer a runner's query")
            reply = {"id": number, "ok": False, "reason": f"{type(exc).__name__}: {exc}"}
        return json.dumps(reply).encode("utf-8") + b"\n"


class _BadQuery(Exception):
    """The runner's query is not one the worker sends (a bad file, shape or scope)."""


def _read_query(
    event: RunnerEvent, job_dir: Path
) -> tuple[np.ndarray, tuple[str, float | None], list[int] | None]:
    info = event.info or {}
    name = (event.file or "").removeprefix(QUERIES_DIR + "/")
    match = QUERY_FILE.match(name)
    if match is None or event.file != f"{QUERIES_DIR}/{name}" or int(match[1]) != info.get("id"):
        raise _BadQuery("the runner named no query file of its own")
    path = job_dir / QUERIES_DIR / name
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_QUERY_BYTES:
        raise _BadQuery("the query file is missing, a link, or larger than the relay takes")
    try:
        batch = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _BadQuery(f"the query file is not a .npy array: {exc}") from None
    if batch.dtype != np.float32 or batch.ndim < 1 or batch.shape[0] < 1:
        raise _BadQuery("a query is a float32 batch of at least one input")
    if not np.isfinite(batch).all():
        raise _BadQuery("a query holds NaN or infinite values")
    check = info.get("check")
    level = info.get("level")
    if not isinstance(check, str) or not 0 < len(check) <= MAX_SCOPE_NAME:
        raise _BadQuery("a query names the check it serves")
    if level is not None and not isinstance(level, int | float):
        raise _BadQuery("a query's level is a number")
    expect = info.get("expect")
    if expect is not None and not (
        isinstance(expect, list) and all(isinstance(d, int) and d > 0 for d in expect)
    ):
        raise _BadQuery("a query's expected shape is a list of positive sizes")
    return batch, (check, None if level is None else float(level)), expect


# -- budgets ----------------------------------------------------------------------------------


def audit_query_budget(settings: Settings, request: AuditRequest) -> int:
    return request.budget.queries or settings.endpoint_query_budget


def _stored_shards(session: Session, audit_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    rows = session.execute(
        select(AuditShard.shard_id, AuditShard.kind, AuditShard.result)
        .where(
            AuditShard.audit_id == audit_id,
            AuditShard.status == "done",
            AuditShard.result.is_not(None),
        )
        .order_by(AuditShard.position)
    )
    return [
        (shard_id, kind, result)
        for shard_id, kind, result in rows
        if isinstance(result, dict) and isinstance(result.get("queries"), dict)
    ]


def _shard_images(result: dict[str, Any]) -> list[int]:
    """The audited images a shard covers (its record's `start` and `stop`)."""
    start, stop = result.get("start"), result.get("stop")
    if isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop:
        return list(range(start, stop))
    return []


def _shard_queries(shard_id: str, kind: str, result: dict[str, Any]) -> dict[str, Any]:
    """One stored shard's check, the images it audited and what its queries cost (the queries
    of one image are those of the shards that name it; with `images_per_shard` 1 each shard is
    one image's)."""
    return {
        "shard": shard_id,
        "check": kind,
        "images": _shard_images(result),
        **{k: int(result["queries"].get(k, 0)) for k in ("sent", "answered", "failures")},
    }


def relay_for(
    settings: Settings,
    session: Session,
    audit: Audit,
    model: Model,
    request: AuditRequest,
) -> QueryRelay | None:
    """The relay of one runner job of the audit (None for an uploaded model), drawing on the
    audit's shared query budget."""
    if model.format != ENDPOINT_FORMAT:
        return None
    total = audit_query_budget(settings, request)
    pool = AuditQueryBudget(session.get_bind(), audit.id, total)  # type: ignore[arg-type]
    return QueryRelay(client_for(settings, model, QueryLedger(budget=total, source=pool)), pool)


def report_queries(
    settings: Settings,
    session: Session,
    audit: Audit,
    request: AuditRequest,
    finalise: QueryLedger | None,
) -> dict[str, Any]:
    """The report's `queries` (docs/reports.md): the ledgers of the plan, the stored shards and
    the finalising step merged, with the audit's budget; every request's latency stays in the
    shards' results, not in the report."""
    shards = _stored_shards(session, audit.id)
    parts = [audit.plan_queries] if audit.plan_queries else []
    parts += [result["queries"] for _, _, result in shards]
    if finalise is not None:
        parts.append(finalise.to_json())
    merged = QueryLedger.merge(parts, budget=audit_query_budget(settings, request))
    merged.pop("latencies_seconds", None)
    return {
        "query_only": True,
        **merged,
        "drawn": int(audit.queries_drawn or 0),
        "by_shard": [_shard_queries(*shard) for shard in shards],
    }


def endpoint_location(model: Model) -> dict[str, Any]:
    """What the report says of the endpoint: where it answers, never the secret."""
    view = EndpointView.model_validate(model.endpoint)
    return {
        "url": view.url,
        "model_name": view.model_name,
        "model_version": view.model_version,
    }
