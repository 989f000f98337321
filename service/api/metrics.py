"""Prometheus metrics: requests by route template and status, their latency, and audits by
status read from the database at scrape time (the database is the truth; counters kept in one
gateway process would miss what the workers did)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.audits import AuditState
from service.db.tables import Audit

log = logging.getLogger(__name__)

AUDIT_STATES: tuple[AuditState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AuditStatusCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "tightrope_audits", "Audits by status (from the database)", labels=["status"]
        )
        try:
            with self.sessions() as session:
                counts = dict(
                    session.execute(select(Audit.status, func.count()).group_by(Audit.status)).all()
                )
        except Exception:
            log.warning("metrics: could not count audits", exc_info=True)
            return  # a scrape without the gauge beats a failed scrape
        for state in AUDIT_STATES:
            gauge.add_metric([state], float(counts.get(state, 0)))
        yield gauge


class Metrics:
    """One registry per app, so several apps (tests) never collide on metric names."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tightrope_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tightrope_http_request_seconds",
            "HTTP request latency by route template and method",
            ["route", "method"],
            registry=self.registry,
        )
        self.registry.register(AuditStatusCollector(sessions))
        # (route, method, status) → its counter and histogram children: `labels` costs a lock
        # and a tuple of strings per request, about a tenth of a cached poll.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe(self, route: str, method: str, status: str, seconds: float) -> None:
        children = self._children.get((route, method, status))
        if children is None:
            children = (
                self.requests.labels(route, method, status),
                self.latency.labels(route, method),
            )
            self._children[(route, method, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (no body buffering, so uploads still stream)."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app dies before answering, that is what the client sees
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The template, not the raw path: ids in paths would explode the label space.
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics().observe(
                template, scope["method"], str(status), time.perf_counter() - start
            )
