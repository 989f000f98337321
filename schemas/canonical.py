"""The one JSON serialisation reports are written, hashed and signed in.

Sorted keys, no spaces, UTF-8 without `\\u` escapes, no NaN: any two parties that parse a
report and re-serialise it this way get the same bytes, whatever the file's own layout was.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
