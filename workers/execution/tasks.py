"""Thin Celery tasks: each one opens a session and hands over to the module that does the work."""

from __future__ import annotations

import logging
from typing import Any

from service.db.session import get_sessionmaker
from service.queue.broker import (
    TASK_ADMIT_MODEL,
    TASK_RUN_AUDIT,
    TASK_RUN_SHARD,
    TASK_SEND_CALLBACK,
)
from service.settings import get_settings
from workers.execution.admission_job import execute_admission
from workers.execution.audit_job import execute_audit
from workers.execution.callbacks import Delivery, backoff_seconds, deliver_callback
from workers.execution.celery_app import app
from workers.execution.job_dir_cache import end_kept_runner
from workers.execution.shard_job import execute_shard

log = logging.getLogger(__name__)


@app.task(name=TASK_RUN_AUDIT, acks_late=True, reject_on_worker_lost=True)
def run_audit(audit_id: str) -> str:
    end_kept_runner()  # a plan or finalising runner never runs beside a kept shard runner
    with get_sessionmaker()() as session:
        return execute_audit(audit_id, settings=get_settings(), session=session)


@app.task(name=TASK_RUN_SHARD, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_shard(self: Any, audit_id: str, queue: str) -> str:
    worker = str(getattr(self.request, "hostname", None) or "worker")
    with get_sessionmaker()() as session:
        return execute_shard(
            audit_id, queue, settings=get_settings(), session=session, worker=worker
        )


@app.task(name=TASK_ADMIT_MODEL, acks_late=True, reject_on_worker_lost=True)
def admit_model(model_id: str) -> str:
    end_kept_runner()  # nor does an admission's
    with get_sessionmaker()() as session:
        return execute_admission(model_id, settings=get_settings(), session=session)


@app.task(name=TASK_SEND_CALLBACK, bind=True, acks_late=True, max_retries=None)
def send_callback(self: Any, audit_id: str) -> str:
    """POST a finished audit's status to its callback_url; retried with exponential backoff
    while the receiver fails transiently, up to callback_max_attempts deliveries."""
    settings = get_settings()
    with get_sessionmaker()() as session:
        outcome = deliver_callback(
            session, settings, audit_id, delivery_id=str(self.request.id or audit_id)
        )
    retries = int(self.request.retries or 0)
    if outcome.delivery is Delivery.RETRY and retries + 1 < settings.callback_max_attempts:
        log.info("callback of %s: %s; retrying", audit_id, outcome.detail)
        raise self.retry(countdown=backoff_seconds(settings, retries))
    if outcome.delivery in (Delivery.RETRY, Delivery.REFUSED):
        log.warning("callback of %s not delivered: %s", audit_id, outcome.detail)
    return outcome.delivery.value
