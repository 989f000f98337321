"""Built-in checks; importing this package registers them (workers.engine.registry.get_check).

worst_case lives in its own module, written beside these; it registers itself when present."""

from __future__ import annotations

import importlib

from workers.engine.checks import (  # noqa: F401 - importing registers their checks
    classifier_checks,
    theorem_checks,
)
from workers.engine.checks.lipschitz import LipschitzRunner
from workers.engine.checks.random_noise import RandomNoiseRunner
from workers.engine.registry import CHECKS, register

for _runner in (RandomNoiseRunner(), LipschitzRunner()):
    if _runner.kind not in CHECKS:
        register(_runner)

try:
    importlib.import_module("workers.engine.checks.worst_case")
except ModuleNotFoundError as exc:  # pragma: no cover - until worst_case.py lands
    if exc.name != "workers.engine.checks.worst_case":
        raise
