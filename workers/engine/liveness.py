"""Whether the audited model is stuck in one call: what the runner's `beat` reads.

Every call of an audited model goes through `run_model`, which counts it here with the size of
its batch. The runner (workers.sandbox.runner) writes a `beat` event every
BEAT_SECONDS unless one call has been running since its last beat without returning, and one
at once when a call starts on a larger batch than any before (the worker's watchdog allows a
call time in proportion to its batch). Torch-free, and cheap: a few attribute writes per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from workers.shared.errors import EndpointQueryFailed, ModelFailed, is_out_of_memory


class ModelCalls:
    """Calls of the model that returned, since when the current one runs (None: none), and the
    largest batch the model was called on."""

    def __init__(self) -> None:
        self.completed = 0
        self.running_since: float | None = None
        self.largest_batch = 0
        # called (in the calling thread) when a call starts on a batch larger than any before
        self.on_larger_batch: Callable[[int], None] | None = None
        self._depth = 0  # a model called inside a model call (a wrapper) counts once

    @contextmanager
    def running(self, batch: int | None = None) -> Iterator[None]:
        if self._depth == 0:
            self.running_since = time.monotonic()
            if batch is not None and batch > self.largest_batch:
                self.largest_batch = batch
                if self.on_larger_batch is not None:
                    self.on_larger_batch(batch)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.running_since = None
                self.completed += 1


MODEL_CALLS = ModelCalls()


def batch_of(args: tuple[object, ...]) -> int | None:
    """The batch size of a model call: the first dimension of its first argument."""
    shape = getattr(args[0], "shape", None) if args else None
    try:
        return int(shape[0]) if shape is not None and len(shape) > 0 else None
    except (TypeError, ValueError):
        return None


def run_model(model: Callable[..., Any], *args: Any) -> Any:
    """model(*args), with what the model raises turned into ModelFailed (memory exhaustion
    stays what it is: the runner reports it as the memory limit). The call is counted in
    MODEL_CALLS: a call that never returns silences the runner's beat."""
    try:
        with MODEL_CALLS.running(batch_of(args)):
            return model(*args)
    except EndpointQueryFailed:
        raise  # an endpoint's query failed: the endpoint's problem, not the model's answer
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise ModelFailed(f"the model raised {type(exc).__name__}: {str(exc)[:500]}") from exc
