"""Registers the checks of the universal instability theorem (docs/theorem.md)."""

from __future__ import annotations

from workers.engine.checks import (  # noqa: F401 - importing registers each check
    false_negative,
    false_positive,
    kernel,
    more_samples,
)
