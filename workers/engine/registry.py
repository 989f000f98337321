"""Checks by `kind` (robust-nets' method registry, applied to checks)."""

from __future__ import annotations

from workers.engine.context import CheckRunner

CHECKS: dict[str, CheckRunner] = {}


def register(runner: CheckRunner) -> CheckRunner:
    if runner.kind in CHECKS:
        raise ValueError(f"check kind {runner.kind!r} registered twice")
    CHECKS[runner.kind] = runner
    return runner


def get_check(kind: str) -> CheckRunner:
    # importing the package registers every built-in check
    import workers.engine.checks  # noqa: F401

    try:
        return CHECKS[kind]
    except KeyError:
        raise KeyError(f"unknown check kind {kind!r}") from None
