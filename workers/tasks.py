"""Thin Celery tasks: each one opens a session and hands over to the module that does the work."""

from __future__ import annotations

from service.db.models import utcnow
from service.db.session import get_sessionmaker
from service.queue import TASK_ADMIT_MODEL, TASK_RECONCILE, TASK_RUN_AUDIT
from service.settings import get_settings
from workers.admission import execute_admission
from workers.audit_job import execute_audit
from workers.celery_app import app
from workers.reconciler import reconcile_once


@app.task(name=TASK_RUN_AUDIT, acks_late=True, reject_on_worker_lost=True)
def run_audit(audit_id: str) -> str:
    with get_sessionmaker()() as session:
        return execute_audit(audit_id, settings=get_settings(), session=session)


@app.task(name=TASK_ADMIT_MODEL, acks_late=True, reject_on_worker_lost=True)
def admit_model(model_id: str) -> str:
    with get_sessionmaker()() as session:
        return execute_admission(model_id, settings=get_settings(), session=session)


@app.task(name=TASK_RECONCILE)
def reconcile() -> dict[str, list[str]]:
    with get_sessionmaker()() as session:
        result = reconcile_once(session, utcnow(), settings=get_settings())
    return {
        "expired_leases": result.expired_leases,
        "lost_messages": result.lost_messages,
        "models": result.models,
    }
