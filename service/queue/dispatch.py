"""Sending task messages from the gateway, with the app's own settings.

The database is the source of truth: a row is committed before its message is sent, and a
message that cannot be sent (broker down) is only logged. The workers' reconciler re-enqueues
audits and models that sit in `queued`/`validating` without a live lease, so a failed send
delays work instead of losing it, and the client never sees a 500 for it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from service.queue.broker import (
    QUEUE_ADMISSION,
    TASK_ADMIT_MODEL,
    TASK_RUN_AUDIT,
    TASK_SEND_CALLBACK,
    make_celery,
    redis_priority,
)
from service.settings import Settings

log = logging.getLogger(__name__)

# Fail fast when the broker is away: the request is already safe in the database.
SEND_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}


class Dispatcher:
    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    @classmethod
    def from_settings(cls, settings: Settings) -> Dispatcher:
        celery = make_celery(settings)
        celery.conf.broker_connection_timeout = 2
        return cls(celery)

    def _send(
        self, task: str, object_id: str, queue: str = QUEUE_ADMISSION, priority: int | None = None
    ) -> bool:
        # Without a priority a message gets the app's task_default_priority (`normal`).
        options: dict[str, Any] = {} if priority is None else {"priority": priority}
        try:
            self.celery.send_task(
                task,
                args=[object_id],
                queue=queue,
                retry=True,
                retry_policy=SEND_RETRY_POLICY,
                **options,
            )
        except Exception:
            log.warning("could not send %s for %s; the reconciler will retry", task, object_id)
            return False
        return True

    def admission(self, model_id: str) -> bool:
        return self._send(TASK_ADMIT_MODEL, model_id)

    def audit(self, audit_id: str, queue: str, priority: str) -> bool:
        """Plan the audit: to its device's queue (broker.audit_queue), at its priority."""
        return self._send(TASK_RUN_AUDIT, audit_id, queue, redis_priority(priority))

    def callback(self, audit_id: str) -> bool:
        """Announce a finished audit to its callback_url (an audit cancelled while queued)."""
        return self._send(TASK_SEND_CALLBACK, audit_id)
