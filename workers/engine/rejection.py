"""The one exception of model admission: a model that cannot be accepted, with a reason a
person can act on. Screening, loading and probing raise it; `admit` turns it into a refusal."""

from __future__ import annotations


class ModelRejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
