"""Sending task messages: the one place that does, for the gateway and the workers alike.

The database is the source of truth: a row is committed before its message is sent, and a
message that cannot be sent (broker down) is only logged. The workers' reconciler re-enqueues
audits, shards and models that sit in `queued`/`validating` without a live lease, so a failed
send delays work instead of losing it, and the client never sees a 500 for it.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Celery

from service.queue.broker import (
    DEFAULT_PRIORITY,
    PRIORITY_STEPS,
    QUEUE_ADMISSION,
    QUEUE_CPU,
    TASK_ADMIT_MODEL,
    TASK_RUN_AUDIT,
    TASK_RUN_SHARD,
    TASK_SEND_CALLBACK,
    make_celery,
    redis_priority,
)
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Fail fast when the broker is away: the request is already safe in the database.
SEND_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}


class Dispatcher:
    """Each method sends one kind of message and answers whether it went out; none raises."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    @classmethod
    def from_settings(cls, settings: Settings) -> Dispatcher:
        celery = make_celery(settings)
        celery.conf.broker_connection_timeout = 2
        return cls(celery)

    def _send(
        self,
        task: str,
        args: list[Any],
        queue: str = QUEUE_ADMISSION,
        priority: int | None = None,
    ) -> bool:
        # Without a priority a message gets the app's task_default_priority (`normal`).
        options: dict[str, Any] = {} if priority is None else {"priority": priority}
        try:
            self.celery.send_task(
                task,
                args=args,
                queue=queue,
                retry=True,
                retry_policy=SEND_RETRY_POLICY,
                **options,
            )
        except Exception:
            log.warning("could not send %s%r; the reconciler will retry", task, args)
            return False
        return True

    def admission(self, model_id: str) -> bool:
        return self._send(TASK_ADMIT_MODEL, [model_id])

    def audit(
        self, audit_id: str, queue: str = QUEUE_CPU, priority: str = DEFAULT_PRIORITY
    ) -> bool:
        """Plan (or finalise) the audit: to its device's queue (broker.audit_queue), at its
        priority."""
        return self._send(TASK_RUN_AUDIT, [audit_id], queue, redis_priority(priority))

    def shards(self, audit_id: str, queue: str, priority: str, count: int) -> bool:
        """`count` shard tokens: each makes one worker of `queue` run the fairest waiting shard
        (the database picks it; `audit_id` only names who asked, for the logs)."""
        # One step after the audit's own messages: a planning (or finalising) message of another
        # audit of the same priority never waits behind a big audit's tokens (fair share needs
        # the other audit planned before its shards can be chosen).
        step = min(redis_priority(priority) + 1, PRIORITY_STEPS[-1])
        return all(self._send(TASK_RUN_SHARD, [audit_id, queue], queue, step) for _ in range(count))

    def callback(self, audit_id: str) -> bool:
        """Announce a finished audit to its callback_url."""
        return self._send(TASK_SEND_CALLBACK, [audit_id])


@lru_cache
def get_dispatcher() -> Dispatcher:
    """The workers' dispatcher, on the process's settings (the gateway keeps its own on
    app.state, made from the app's settings)."""
    return Dispatcher.from_settings(get_settings())
