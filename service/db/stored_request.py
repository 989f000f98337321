"""The audit's stored request, read back typed.

`Audit.request` holds the canonical AuditRequest the gateway accepted (defaults filled in), as
JSON. Every reader goes through `stored_request`, which validates it into
schemas.audits.AuditRequest once, so the fields are typed (`request.budget.wall_seconds`,
`request.callback_url`) and the defaults are the schema's.

A stored request that no longer validates (written by an older version whose schema has since
changed) raises StoredRequestInvalid, naming the audit and the fields: the worker fails such an
audit with `invalid-audit-input` (it cannot run what it can no longer read) instead of retrying
it. Where the audit is only being ended or announced (its callback), `stored_callback_url`
reads no callback from such a request rather than stopping the ending halfway.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from schemas.audits import AuditRequest

log = logging.getLogger(__name__)


class StoredRequestInvalid(ValueError):
    """The stored request of an audit does not validate against the current AuditRequest."""


def stored_request(raw: Mapping[str, Any] | None, *, audit_id: str = "") -> AuditRequest:
    """The stored request as an AuditRequest; StoredRequestInvalid when it no longer validates."""
    try:
        return AuditRequest.model_validate(dict(raw or {}))
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'request'}: {error['msg']}"
            for error in exc.errors()
        )
        whose = f"audit {audit_id}" if audit_id else "the audit"
        raise StoredRequestInvalid(
            f"the stored request of {whose} no longer validates (stored by an earlier version?): "
            f"{fields}; submit the audit again"
        ) from exc


def stored_callback_url(raw: Mapping[str, Any] | None, *, audit_id: str = "") -> str | None:
    """The request's callback_url, or None; a request that no longer validates has none (logged)."""
    try:
        request = stored_request(raw, audit_id=audit_id)
    except StoredRequestInvalid as exc:
        log.warning("%s: no callback is sent", exc)
        return None
    return None if request.callback_url is None else str(request.callback_url)
