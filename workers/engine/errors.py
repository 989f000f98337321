"""Errors the engine raises on purpose; the runner turns them into a failed audit with a reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers.engine.liveness import MODEL_CALLS, batch_of


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


def run_model(model: Callable[..., Any], *args: Any) -> Any:
    """model(*args), with what the model raises turned into ModelFailed (memory exhaustion
    stays what it is: the runner reports it as the memory limit). The call is counted in
    MODEL_CALLS: a call that never returns silences the runner's beat (workers.engine.liveness)."""
    try:
        with MODEL_CALLS.running(batch_of(args)):
            return model(*args)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise ModelFailed(f"the model raised {type(exc).__name__}: {str(exc)[:500]}") from exc
