"""Delivering an audit's `callback_url` (docs/reports.md, "Callbacks").

When an audit reaches `succeeded`, `failed` or `cancelled`, a `tightrope.send_callback` task
POSTs its AuditStatus JSON, signed with the tenant's HMAC secret (service.signing.callbacks).
A delivery is done on any 2xx. Connection errors, timeouts, 408, 429 and 5xx are retried with
exponential backoff up to `callback_max_attempts`; other answers are final. Redirects are never
followed, to any host: a 3xx is a final failure, so a receiver cannot bounce the service's
request onto another host (or onto an internal address).

The destination is checked again here, just before connecting (schemas.callback_targets, as at
submission): the host is resolved once, every address must be public unless
`TIGHTROPE_CALLBACK_ALLOW` names it, and the POST then goes to that checked address: the URL's
host is replaced by the IP, the `Host` header keeps the original host, and for https the TLS
server name (SNI and certificate verification) stays the original host through httpx's
`sni_hostname` request extension. A DNS answer that changes between the check and the connect
(rebinding) therefore cannot steer the POST inside. A refused destination is a final failure;
a host that does not resolve is retried like a connection error. When an environment proxy
applies (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, minus `NO_PROXY`), the POST goes through
that proxy, which resolves the name itself: the check still runs first, but the pinning is the
proxy's (or a network policy's) job there.
"""

from __future__ import annotations

import enum
import logging
import urllib.request
from dataclasses import dataclass

import httpx
from sqlalchemy.orm import Session

from schemas.audits import TERMINAL_STATES
from schemas.callback_targets import (
    CallbackHostUnresolved,
    CallbackTargetRefused,
    Target,
    check_target,
)
from service.db.audit_status import to_status
from service.db.stored_request import stored_callback_url
from service.db.tables import Audit
from service.settings import Settings
from service.signing import callbacks as callback_signing

log = logging.getLogger(__name__)

EVENT = "audit.finished"
RETRYABLE_STATUS = {408, 425, 429}
MAX_BACKOFF_SECONDS = 600.0


class Delivery(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # a transient failure: try again later
    REFUSED = "refused"  # a final failure (4xx, a redirect, an internal destination)
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


def _environment_proxy(url: httpx.URL) -> str | None:
    """The proxy the environment names for this URL (the variables httpx honours), if any."""
    proxies = urllib.request.getproxies_environment()
    if urllib.request.proxy_bypass(url.host, proxies):  # NO_PROXY (on Linux, from `proxies`)
        return None
    return proxies.get(url.scheme) or proxies.get("all") or None


def _post(
    settings: Settings, url: str, target: Target, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    """POST to the checked address (or through the environment's proxy); trust_env is off so
    that httpx itself never picks a route or re-resolves the name behind our back."""
    original = httpx.URL(url)
    proxy = _environment_proxy(original)
    with httpx.Client(
        follow_redirects=False,
        timeout=settings.callback_timeout_seconds,
        trust_env=False,
        proxy=proxy,
    ) as client:
        if proxy is not None:
            return client.post(original, content=body, headers=headers)
        pinned_headers = {**headers, "Host": original.netloc.decode("ascii")}
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        failure: httpx.ConnectError | None = None
        for address in target.addresses:  # e.g. an IPv6 address on a host without IPv6 routes
            try:
                return client.post(
                    original.copy_with(host=str(address)),
                    content=body,
                    headers=pinned_headers,
                    extensions=extensions,
                )
            except httpx.ConnectError as exc:
                failure = exc
        assert failure is not None  # check_target never returns a target without addresses
        raise failure


def deliver_callback(
    session: Session, settings: Settings, audit_id: str, *, delivery_id: str = ""
) -> Outcome:
    """One delivery attempt of a finished audit's status to its callback_url."""
    audit = session.get(Audit, audit_id, populate_existing=True)
    if audit is None:
        return Outcome(Delivery.SKIPPED, "no such audit")
    url = stored_callback_url(audit.request, audit_id=audit.id)
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
        target = check_target(
            url, settings.callback_allow_list, timeout=settings.callback_timeout_seconds
        )
    except CallbackHostUnresolved as exc:
        return Outcome(Delivery.RETRY, str(exc))
    except CallbackTargetRefused as exc:
        return Outcome(Delivery.REFUSED, f"destination refused: {exc}")
    try:
        response = _post(settings, url, target, body, headers)
    except httpx.HTTPError as exc:
        return Outcome(Delivery.RETRY, f"{type(exc).__name__}: {exc}")
    return _classify(response)
