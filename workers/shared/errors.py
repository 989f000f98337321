"""Errors the engine raises on purpose; the runner turns them into a failed audit with a reason.
Torch-free: the runner, the CLI and the report renderer catch them without importing the engine.
"""

from __future__ import annotations


class EngineInputError(ValueError):
    """The audit's inputs cannot work together (operator, dataset, model spec); the message says
    what to change. Never raised for a bug in the engine."""


class AuditCancelled(Exception):
    """`should_stop` answered True between two shards: the audit stops cooperatively."""


class ModelFailed(EngineInputError):
    """The audited model raised while the audit ran it (after its admission passed): the
    model's fault, reported to its owner as an invalid input, never as an engine error."""


def is_out_of_memory(exc: BaseException) -> bool:
    # torch's CPU allocator raises RuntimeError rather than MemoryError when RLIMIT_AS bites.
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("can't allocate memory" in str(exc) or "out of memory" in str(exc).lower())
    )


class EndpointQueryFailed(Exception):
    """An endpoint model's query could not be answered (the endpoint failed past its retries,
    answered wrongly, or the audit's query budget is spent): the audit fails with a named
    problem (`endpoint-unavailable`, `query-budget-exhausted`), never counts it as stability."""

    def __init__(self, message: str, *, budget_spent: bool = False) -> None:
        super().__init__(message)
        self.budget_spent = budget_spent
