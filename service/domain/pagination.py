"""Opaque page tokens for keyset pagination, newest first: base64 of (created_at, id).

Keyset rather than offset pagination: a page stays correct while rows are being inserted, and
each page costs an index seek instead of a scan over everything before it.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import InstrumentedAttribute

from schemas.problem import FieldError
from service.domain.errors import ValidationFailed

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100

T = TypeVar("T", bound=Any)


def encode_token(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[datetime, str]:
    """(created_at, id) of the last row of the previous page; a bad token is a 422."""
    try:
        padded = token + "=" * (-len(token) % 4)
        created_at, row_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        when = datetime.fromisoformat(created_at)
        if when.tzinfo is None or not isinstance(row_id, str):
            raise ValueError("malformed")
        return when, row_id
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        error = FieldError(loc=["query", "page_token"], msg="not a page token", type="value_error")
        raise ValidationFailed(
            "page_token is not a token this service issued; start again without it.",
            errors=[error],
        ) from None


def paginate(
    query: Select[T],
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[str],
    page_token: str | None,
    page_size: int,
) -> Select[T]:
    """Order newest first and start after the token's row; fetches one extra row to tell
    whether another page follows (see `split_page`)."""
    if page_token:
        after_time, after_id = decode_token(page_token)
        # A row-value comparison, not `a < t OR (a = t AND id < i)`: both SQLite and PostgreSQL
        # seek the (…, created_at, id) index to the token with it, where the OR form is a filter
        # over every row before the page (a deep page cost as much as reading all of them).
        query = query.where(tuple_(created_at, row_id) < tuple_(after_time, after_id))
    return query.order_by(created_at.desc(), row_id.desc()).limit(page_size + 1)


def split_page(rows: list[Any], page_size: int) -> tuple[list[Any], str | None]:
    """The page's rows and the token of the next page (None on the last page)."""
    if len(rows) <= page_size:
        return rows, None
    rows = rows[:page_size]
    last = rows[-1]
    return rows, encode_token(last.created_at, last.id)
