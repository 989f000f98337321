"""Errors the engine raises on purpose; the runner turns them into a failed audit with a reason."""

from __future__ import annotations


class EngineInputError(ValueError):
    """The audit's inputs cannot work together (operator, dataset, model spec); the message says
    what to change. Never raised for a bug in the engine."""


class AuditCancelled(Exception):
    """`should_stop` answered True between two shards: the audit stops cooperatively."""
