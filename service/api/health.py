"""Liveness and readiness. Readiness asks the four things an audit needs: the database, the
broker, a worker that wrote a heartbeat recently (a busy solo worker does not answer Celery
pings, so the database heartbeat is the signal), and a live worker that can sandbox uploaded
models (each heartbeat says whether its start-up probe of bubblewrap worked; docs/security.md,
"Without bubblewrap")."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Literal

from fastapi import APIRouter, Request, Response
from kombu import Connection
from pydantic import BaseModel, Field
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.api.deps import SessionDep, SettingsDep
from service.api.metrics import CONTENT_TYPE, Metrics
from service.api.problems import problem_responses, retry_after_header
from service.db.heartbeats import SANDBOXED_FORMATS, SandboxCount, sandbox_count
from service.db.tables import WorkerHeartbeat, utcnow
from service.domain.errors import NotReady
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


class Readiness(BaseModel):
    status: Literal["ready", "degraded"] = Field(
        description="`ready`; `degraded` only with TIGHTROPE_READY_WITHOUT_SANDBOX when no "
        "live worker can sandbox models (otherwise that is a 503 naming `sandbox`)"
    )
    sandbox: str = Field(
        description="Whether the live workers can sandbox uploaded models, e.g. `available on "
        "3 of 3 live workers`, `unavailable on 1 of 3 live workers`, `off on 1 of 1 live workers`"
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What works only in part, e.g. the workers that cannot sandbox and why",
    )


def _problems(count: SandboxCount, limit: int = 3) -> str:
    shown = [p[:500] for p in count.problems[:limit]]
    more = len(count.problems) - len(shown)
    return " | ".join(shown) + (f" | and {more} more" if more > 0 else "")


def sandbox_summary(count: SandboxCount) -> str:
    parts = []
    if count.unavailable:
        parts.append(f"unavailable on {count.unavailable} of {count.live} live workers")
    if count.off:
        parts.append(f"off on {count.off} of {count.live} live workers")
    if not parts:
        parts.append(f"available on {count.live} of {count.live} live workers")
    return "; ".join(parts)


def sandbox_warnings(count: SandboxCount, settings: Settings) -> tuple[str | None, list[str]]:
    """(the problem when no live worker can sandbox, warnings when some cannot or run off)."""
    warnings = []
    if count.off:
        warnings.append(
            f"sandbox: off on {count.off} of {count.live} live workers (TIGHTROPE_SANDBOX=off): "
            "uploaded models run unconfined there, unsafe with models from others"
        )
    if count.unavailable and count.able == 0:
        return (
            f"sandbox: no live worker can sandbox models (unavailable on {count.unavailable} "
            f"of {count.live}: {_problems(count)}); {SANDBOXED_FORMATS} uploads cannot be "
            f"admitted and are refused {settings.sandbox_wait_seconds:g} s after their upload"
        ), warnings
    if count.unavailable:
        warnings.append(
            f"sandbox: unavailable on {count.unavailable} of {count.live} live workers "
            f"({_problems(count)}); {SANDBOXED_FORMATS} uploads they get wait for another"
        )
    return None, warnings


@router.get(
    "/readyz",
    summary="Readiness",
    response_model=Readiness,
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
def readyz(session: SessionDep, settings: SettingsDep) -> Readiness:
    problems = [
        p
        for p in (
            database_problem(session),
            broker_problem(settings),
            worker_problem(session, settings),
        )
        if p is not None
    ]
    count = SandboxCount()
    warnings: list[str] = []
    if not problems:
        count = sandbox_count(session, settings.worker_stale_seconds)
        no_sandbox, warnings = sandbox_warnings(count, settings)
        if no_sandbox is not None and settings.ready_without_sandbox:
            warnings.insert(0, no_sandbox)
            return Readiness(status="degraded", sandbox=sandbox_summary(count), warnings=warnings)
        if no_sandbox is not None:
            log.warning("readiness: %s", no_sandbox)
            problems.append(no_sandbox)
    if problems:
        raise NotReady("; ".join(problems), extra={"down": [p.split(":")[0] for p in problems]})
    return Readiness(status="ready", sandbox=sandbox_summary(count), warnings=warnings)


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
