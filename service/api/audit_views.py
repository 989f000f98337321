"""The API view of an audit row, and the ETag logic of polling."""

from __future__ import annotations

import hashlib

# to_status lives outside the HTTP layer: the workers' callbacks send the same view.
from service.audit_status import to_status

__all__ = ["etag_of", "if_none_match_hits", "to_status"]


def etag_of(body: bytes) -> str:
    """A strong validator: the body's hash, so any visible change gives a new tag."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def if_none_match_hits(header: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2: weak comparison, a list of tags or `*`."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return etag in tags
