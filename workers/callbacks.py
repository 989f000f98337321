"""Delivering an audit's `callback_url` (docs/reports.md, "Callbacks").

When an audit reaches `succeeded`, `failed` or `cancelled`, a `tightrope.send_callback` task
POSTs its AuditStatus JSON, signed with the tenant's HMAC secret (service.callback_signing).
A delivery is done on any 2xx. Connection errors, timeouts, 408, 429 and 5xx are retried with
exponential backoff up to `callback_max_attempts`; other answers are final. Redirects are never
followed, to any host: a 3xx is a final failure, so a receiver cannot bounce the service's
request onto another host (or onto an internal address).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import httpx
from sqlalchemy.orm import Session

from schemas.audits import TERMINAL_STATES
from service import callback_signing
from service.audit_status import to_status
from service.db.models import Audit
from service.settings import Settings

log = logging.getLogger(__name__)

EVENT = "audit.finished"
RETRYABLE_STATUS = {408, 425, 429}
MAX_BACKOFF_SECONDS = 600.0


class Delivery(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # a transient failure: try again later
    REFUSED = "refused"  # a final failure (4xx, a redirect)
    SKIPPED = "skipped"  # no callback_url, no such audit, or not finished


@dataclass(frozen=True)
class Outcome:
    delivery: Delivery
    detail: str


def backoff_seconds(settings: Settings, retries_done: int) -> float:
    """Exponential: base, 2·base, 4·base … capped at ten minutes."""
    return float(min(settings.callback_backoff_seconds * 2**retries_done, MAX_BACKOFF_SECONDS))


def _classify(response: httpx.Response) -> Outcome:
    code = response.status_code
    if 200 <= code < 300:
        return Outcome(Delivery.DELIVERED, f"answered {code}")
    if 300 <= code < 400:
        where = response.headers.get("location", "?")
        return Outcome(Delivery.REFUSED, f"answered {code} to {where}: redirects are not followed")
    if code >= 500 or code in RETRYABLE_STATUS:
        return Outcome(Delivery.RETRY, f"answered {code}")
    return Outcome(Delivery.REFUSED, f"answered {code}")


def deliver_callback(
    session: Session, settings: Settings, audit_id: str, *, delivery_id: str = ""
) -> Outcome:
    """One delivery attempt of a finished audit's status to its callback_url."""
    audit = session.get(Audit, audit_id, populate_existing=True)
    if audit is None:
        return Outcome(Delivery.SKIPPED, "no such audit")
    url = (audit.request or {}).get("callback_url")
    if not url:
        return Outcome(Delivery.SKIPPED, "the audit has no callback_url")
    if audit.status not in TERMINAL_STATES:
        return Outcome(Delivery.SKIPPED, f"the audit is still {audit.status}")
    body = to_status(audit).model_dump_json().encode("utf-8")
    secret = callback_signing.tenant_secret(settings, audit.tenant_id)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "tightrope-callback/1",
        "Tightrope-Event": EVENT,
        "Tightrope-Delivery": delivery_id or audit_id,
        callback_signing.HEADER: callback_signing.signature_header(secret, body),
    }
    try:
        with httpx.Client(
            follow_redirects=False, timeout=settings.callback_timeout_seconds
        ) as client:
            response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return Outcome(Delivery.RETRY, f"{type(exc).__name__}: {exc}")
    return _classify(response)
