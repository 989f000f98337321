"""The Celery configuration shared by the gateway (which only sends) and the workers.

Lives here, free of torch, so the gateway can enqueue without importing the workers.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from service.settings import Settings, get_settings

TASK_ADMIT_MODEL = "tightrope.admit_model"
TASK_RUN_AUDIT = "tightrope.run_audit"
TASK_RECONCILE = "tightrope.reconcile"
QUEUE = "tightrope"


def make_celery(settings: Settings) -> Celery:
    app = Celery("tightrope", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,  # results live in the database
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_soft_time_limit=settings.audit_soft_time_limit,
        task_time_limit=settings.audit_hard_time_limit,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_audit(audit_id: str) -> None:
    get_celery().send_task(TASK_RUN_AUDIT, args=[audit_id], queue=QUEUE)


def enqueue_admission(model_id: str) -> None:
    get_celery().send_task(TASK_ADMIT_MODEL, args=[model_id], queue=QUEUE)
