"""The query ledger of an endpoint audit: what every query to the vendor's endpoint cost.

Counted per (check, level) and per (check, level, image):

- `sent`: inputs sent to the endpoint, every attempt counted (a retried request sends its
  inputs again, and the vendor sees them again): the query budget caps it;
- `answered`: inputs the endpoint answered with a valid output;
- `requests`, `failures` (attempts that failed: an HTTP error, a time-out, a reset connection,
  a wrong or non-finite answer), `retries` (attempts after a failure);
- the latency of every answered request, whence p50 and p99;
- failures by cause (`http 503`, `timeout`, `connection`, `wrong shape`, ...).

A shard keeps a ledger of its own and writes it into its result (`to_json`); the report merges
the shards' (`merge`), so a shard that is run again after a worker died replaces its lost
result instead of adding to it: no query is counted twice or lost. Standard library only.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# One query's place in the audit: the check, the level (None where the check has none), the
# image (None for queries that serve no one image: the admission's probe).
Scope = tuple[str, float | None]


class QueryBudgetExhausted(Exception):
    """The audit's query budget is spent: a query that would exceed it is not sent."""


@dataclass
class _Counts:
    sent: int = 0
    answered: int = 0
    requests: int = 0
    failures: int = 0
    retries: int = 0

    def add(self, other: _Counts) -> None:
        self.sent += other.sent
        self.answered += other.answered
        self.requests += other.requests
        self.failures += other.failures
        self.retries += other.retries

    def as_dict(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "requests": self.requests,
            "failures": self.failures,
            "retries": self.retries,
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) by linear interpolation between order statistics (numpy's
    default), None of no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class BudgetSource(Protocol):
    """Where a ledger draws its budget from when several share one (the shards of an audit on
    several workers: workers.execution.query_budget)."""

    def take(self, inputs: int) -> int:
        """Grant at least `inputs` more inputs (it may grant more, in advance), or 0."""
        ...


@dataclass
class QueryLedger:
    """Thread-safe: the client's threads charge it concurrently. `budget`: the most inputs
    this ledger may send (None: no cap). With a `source`, the budget is shared: every input
    sent is drawn from it first (`budget` then only names the shared budget in messages and
    the ledger)."""

    budget: int | None = None
    source: BudgetSource | None = None
    granted: int = 0  # drawn from the source and not yet sent (`unspent` at the end)
    _by_scope: dict[Scope, _Counts] = field(default_factory=dict)
    _by_image: Counter[tuple[str, float | None, int]] = field(default_factory=Counter)
    _latencies: list[float] = field(default_factory=list)
    _causes: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _counts(self, scope: Scope) -> _Counts:
        return self._by_scope.setdefault(scope, _Counts())

    @property
    def sent(self) -> int:
        with self._lock:
            return sum(c.sent for c in self._by_scope.values())

    def reserve(self, scope: Scope, inputs: int) -> None:
        """Count `inputs` about to be sent (one attempt of one request), or raise
        QueryBudgetExhausted, sending nothing, if that would exceed the budget."""
        with self._lock:
            if self.source is not None:
                if self.granted < inputs:
                    self.granted += self.source.take(inputs - self.granted)
                if self.granted < inputs:
                    raise QueryBudgetExhausted(
                        f"the query budget of {self.budget} is spent (the audit's steps have "
                        f"drawn all of it; this request needs {inputs} more)"
                    )
                self.granted -= inputs
            elif self.budget is not None:
                spent = sum(c.sent for c in self._by_scope.values())
                if spent + inputs > self.budget:
                    raise QueryBudgetExhausted(
                        f"the query budget of {self.budget} is spent ({spent} sent; this "
                        f"request needs {inputs} more)"
                    )
            counts = self._counts(scope)
            counts.sent += inputs
            counts.requests += 1

    def answered(self, scope: Scope, images: Sequence[int | None], latency_seconds: float) -> None:
        """One request answered validly: its inputs, one per entry of `images`."""
        with self._lock:
            self._counts(scope).answered += len(images)
            for image in images:
                if image is not None:
                    self._by_image[(scope[0], scope[1], int(image))] += 1
            self._latencies.append(float(latency_seconds))

    def failed(self, scope: Scope, cause: str) -> None:
        with self._lock:
            self._counts(scope).failures += 1
            self._causes[cause] += 1

    def retried(self, scope: Scope) -> None:
        with self._lock:
            self._counts(scope).retries += 1

    def to_json(self) -> dict[str, Any]:
        """The ledger as JSON: totals, latency percentiles, per check and level, per image,
        failures by cause, and every answered request's latency (so shards merge exactly)."""
        with self._lock:
            scopes = sorted(self._by_scope.items(), key=lambda kv: _scope_key(kv[0]))
            return _summary(
                [(scope, counts) for scope, counts in scopes],
                dict(self._by_image),
                list(self._latencies),
                dict(self._causes),
                self.budget,
            )

    @staticmethod
    def merge(parts: Iterable[dict[str, Any]], budget: int | None = None) -> dict[str, Any]:
        """The ledgers of several shards (their `to_json`) as one."""
        scopes: dict[Scope, _Counts] = {}
        images: Counter[tuple[str, float | None, int]] = Counter()
        latencies: list[float] = []
        causes: Counter[str] = Counter()
        for part in parts:
            for row in part.get("by_check", []):
                scope = (str(row["check"]), _level(row.get("level")))
                scopes.setdefault(scope, _Counts()).add(
                    _Counts(**{k: int(row[k]) for k in _Counts().as_dict()})
                )
            for row in part.get("by_image", []):
                key = (str(row["check"]), _level(row.get("level")), int(row["image"]))
                images[key] += int(row["answered"])
            latencies.extend(float(v) for v in part.get("latencies_seconds", []))
            causes.update({str(k): int(v) for k, v in part.get("failures_by_cause", {}).items()})
        ordered = sorted(scopes.items(), key=lambda kv: _scope_key(kv[0]))
        return _summary(ordered, dict(images), latencies, dict(causes), budget)


def _level(value: Any) -> float | None:
    return None if value is None else float(value)


def _scope_key(scope: Scope) -> tuple[str, float]:
    return (scope[0], -math.inf if scope[1] is None else scope[1])


def _summary(
    scopes: list[tuple[Scope, _Counts]],
    images: dict[tuple[str, float | None, int], int],
    latencies: list[float],
    causes: dict[str, int],
    budget: int | None,
) -> dict[str, Any]:
    total = _Counts()
    for _, counts in scopes:
        total.add(counts)
    return {
        **total.as_dict(),
        "budget": budget,
        "latency_seconds": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies) if latencies else None,
        },
        "by_check": [
            {"check": scope[0], "level": scope[1], **counts.as_dict()} for scope, counts in scopes
        ],
        "by_image": [
            {"check": check, "level": level, "image": image, "answered": count}
            for (check, level, image), count in sorted(
                images.items(), key=lambda kv: (*_scope_key(kv[0][:2]), kv[0][2])
            )
        ],
        "failures_by_cause": dict(sorted(causes.items())),
        "latencies_seconds": [round(v, 6) for v in latencies],
    }
