"""Run batched work that may not fit the device: on out-of-memory, halve the batch and go on.

The caller's function must be safe to retry on a smaller slice (pure per item), which holds for
the worst-case search: each image has its own random stream, so the result does not depend on
the batch it ran in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError that says so (CPU allocator, MPS, older torch)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def run_in_batches(
    work: Callable[[int, int], T],
    total: int,
    batch_size: int,
    warnings: list[str],
    label: str = "batch",
) -> list[T]:
    """Call `work(start, stop)` over [0, total) in slices of at most `batch_size` items.

    When a slice runs out of memory the batch size is halved and the same slice retried; the
    smaller size is kept for the rest of the run. A warning is appended to `warnings` each time.
    Raises the out-of-memory error when even one item does not fit.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    results: list[T] = []
    start = 0
    while start < total:
        stop = min(start + batch_size, total)
        try:
            results.append(work(start, stop))
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error) or stop - start == 1:
                raise
            batch_size = max(1, (stop - start) // 2)
            warnings.append(
                f"{label}: out of memory at {stop - start} items per batch; "
                f"continuing with {batch_size}"
            )
        else:
            start = stop
            continue
        # outside the except block: the traceback (and the tensors its frames hold) is gone
        _release_cached_memory()
    return results


def _release_cached_memory() -> None:
    # the failed attempt's tensors are garbage now; hand their blocks back before retrying
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
