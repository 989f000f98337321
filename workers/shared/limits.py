"""The archive limits the engine holds files to (schemas.archive_rules.ArchiveLimits).

The sandboxed runner sets them from its job (schemas.runner.RunnerRequest.archive_limits, which the
worker fills from its settings, the gateway's values) for as long as it runs the job; anything
else (the local CLI, tests) gets the defaults, which are the settings' defaults. torch-free.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from schemas.archive_rules import DEFAULT_ARCHIVE_LIMITS, ArchiveLimits

_LIMITS: ContextVar[ArchiveLimits] = ContextVar("archive_limits", default=DEFAULT_ARCHIVE_LIMITS)


def archive_limits() -> ArchiveLimits:
    """The limits in force."""
    return _LIMITS.get()


@contextmanager
def archive_limits_in_force(limits: ArchiveLimits) -> Iterator[None]:
    """Hold every archive the engine reads in this block to `limits`."""
    token = _LIMITS.set(limits)
    try:
        yield
    finally:
        _LIMITS.reset(token)
