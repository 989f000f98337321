"""The Celery configuration shared by the gateway (which only sends) and the workers.

Lives here, free of torch, so the gateway can enqueue without importing the workers; the
messages themselves are sent by service.queue.dispatch.
"""

from __future__ import annotations

import redis
from celery import Celery

from service.settings import Settings

TASK_ADMIT_MODEL = "tightrope.admit_model"
TASK_RUN_AUDIT = "tightrope.run_audit"  # plan an audit's shards, or finalise it once all are done
TASK_RUN_SHARD = "tightrope.run_shard"  # run the fairest waiting shard of a queue
TASK_SEND_CALLBACK = "tightrope.send_callback"

# Queues (docs/deployment.md, "Queues and workers"): admissions and callbacks never wait
# behind an audit; audits with `device: cuda` go to the GPU queue, which only GPU workers read.
QUEUE_ADMISSION = "tightrope.admission"
QUEUE_CPU = "tightrope.cpu"
QUEUE_GPU = "tightrope.gpu"
ALL_QUEUES = (QUEUE_ADMISSION, QUEUE_CPU, QUEUE_GPU)
QUEUE = QUEUE_ADMISSION  # the default queue of a task sent without one

# Celery priorities on Redis: messages of each queue live in one list per step and a worker
# empties the lower step first (0 = first served). An audit's priority maps onto them.
PRIORITY_STEPS = list(range(10))
REDIS_PRIORITY = {"high": 0, "normal": 4, "low": 8}
DEFAULT_PRIORITY = "normal"


def audit_queue(device: str) -> str:
    """The queue of an audit's tasks: `cuda` needs a GPU worker; `cpu` and `auto` run anywhere
    (a GPU worker also reads the CPU queue, and `auto` then uses its GPU)."""
    return QUEUE_GPU if device == "cuda" else QUEUE_CPU


def redis_priority(priority: str | None) -> int:
    return REDIS_PRIORITY.get(priority or DEFAULT_PRIORITY, REDIS_PRIORITY[DEFAULT_PRIORITY])


def broker_keys(queue: str) -> list[str]:
    """The Redis lists holding a queue's messages, first served first (one per priority step)."""
    return [queue if step == 0 else f"{queue}:{step}" for step in PRIORITY_STEPS]


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
    return {
        "visibility_timeout": settings.visibility_timeout,
        "priority_steps": PRIORITY_STEPS,
        "sep": ":",
        "queue_order_strategy": "priority",
    }


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
        task_default_priority=REDIS_PRIORITY[DEFAULT_PRIORITY],
        task_soft_time_limit=settings.audit_soft_time_limit,
        task_time_limit=settings.audit_hard_time_limit,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app


def tokens_waiting(settings: Settings, queue: str) -> int | None:
    """Messages waiting in `queue` on a Redis broker (every priority step); None when it cannot
    be told (another broker, Redis unreachable). The reconciler sends lost shard tokens only
    for the shortfall, rather than a new token per waiting shard on every pass."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return int(sum(client.llen(key) for key in broker_keys(queue)))
    except redis.RedisError:
        return None
    finally:
        client.close()
