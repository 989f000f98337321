"""Liveness and readiness. Readiness asks the three things an audit needs: the database, the
broker, and a worker that wrote a heartbeat recently (a busy solo worker does not answer Celery
pings, so the database heartbeat is the signal)."""

from __future__ import annotations

import logging
from datetime import timedelta

from fastapi import APIRouter, Request, Response
from kombu import Connection
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.api.deps import SessionDep, SettingsDep
from service.api.metrics import CONTENT_TYPE, Metrics
from service.api.problems import NotReady, problem_responses, retry_after_header
from service.db.models import WorkerHeartbeat, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_SECONDS = 2.0


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def database_problem(session: Session) -> str | None:
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("readiness: database unreachable: %s", exc)
        return "database: not answering"
    return None


def broker_problem(settings: Settings) -> str | None:
    try:
        with Connection(settings.broker_url, connect_timeout=BROKER_TIMEOUT_SECONDS) as conn:
            conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
    except Exception as exc:
        log.warning("readiness: broker unreachable: %s", exc)
        return "broker: not answering"
    return None


def worker_problem(session: Session, settings: Settings) -> str | None:
    try:
        last_seen = session.scalar(
            select(WorkerHeartbeat.last_seen).order_by(WorkerHeartbeat.last_seen.desc()).limit(1)
        )
    except Exception:
        return None  # already reported as a database problem
    cutoff = utcnow() - timedelta(seconds=settings.worker_stale_seconds)
    if last_seen is None:
        return "worker: no worker has ever reported"
    if last_seen < cutoff:
        return f"worker: no heartbeat for over {settings.worker_stale_seconds:.0f} s"
    return None


@router.get(
    "/readyz",
    summary="Readiness",
    responses=problem_responses(
        503,
        headers={
            503: {
                "Retry-After": retry_after_header(
                    "Only when busy (no database slot in time); a dependency that is down "
                    "(`not-ready`, `extra.down` names it) comes without it",
                    required=False,
                )
            }
        },
    ),
)
def readyz(session: SessionDep, settings: SettingsDep) -> dict[str, str]:
    problems = [
        p
        for p in (
            database_problem(session),
            broker_problem(settings),
            worker_problem(session, settings),
        )
        if p is not None
    ]
    if problems:
        raise NotReady("; ".join(problems), extra={"down": [p.split(":")[0] for p in problems]})
    return {"status": "ready"}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
)
def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)
