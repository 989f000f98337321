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
TASK_SEND_CALLBACK = "tightrope.send_callback"
QUEUE = "tightrope"


def broker_transport_options(settings: Settings) -> dict[str, object]:
    """Redis needs a visibility timeout above the hard limit; the embedded filesystem transport
    (one host, no Redis: see docs/architecture.md) needs its folders."""
    if settings.broker_url.startswith("filesystem://"):
        folder = (settings.data_dir / "broker").resolve()
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # default: the working directory
            "store_processed": False,
            "polling_interval": 0.2,
        }
    return {"visibility_timeout": settings.visibility_timeout}


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
        broker_transport_options=broker_transport_options(settings),
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


def enqueue_callback(audit_id: str) -> None:
    get_celery().send_task(TASK_SEND_CALLBACK, args=[audit_id], queue=QUEUE)
