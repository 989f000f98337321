"""The table of checks: every `kind` an audit config can name, and the engine module that runs
it. Adding a check means a schema (schemas/checks*.py), a module in workers/engine/checks/, a
row here and a section in the docs (docs/architecture.md, "Adding a check").

A check's module is imported the first time an audit names its kind: every sandboxed step
imports the engine afresh, and the classifier attacks (adv-lib, AutoAttack) or the theorem
checks' figures cost a random-noise audit about 0.6 s of imports in each step otherwise."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Mapping
from types import MappingProxyType

from workers.engine.context import Check

# kind -> (module, class)
TABLE: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "random_noise": ("workers.engine.checks.random_noise", "RandomNoise"),
        "worst_case": ("workers.engine.checks.worst_case", "WorstCase"),
        "lipschitz": ("workers.engine.checks.lipschitz", "Lipschitz"),
        "false_negative": ("workers.engine.checks.false_negative", "FalseNegative"),
        "false_positive": ("workers.engine.checks.false_positive", "FalsePositive"),
        "kernel": ("workers.engine.checks.kernel", "Kernel"),
        "more_samples": ("workers.engine.checks.more_samples", "MoreSamples"),
        "adversarial": ("workers.engine.checks.adversarial", "Adversarial"),
        "minimal_perturbation": (
            "workers.engine.checks.minimal_perturbation",
            "MinimalPerturbation",
        ),
        "universal": ("workers.engine.checks.universal", "Universal"),
    }
)


class _Checks(Mapping[str, Check]):
    """The table as a read-only mapping of kind -> check, each built on first use."""

    def __init__(self, table: Mapping[str, tuple[str, str]]) -> None:
        self._table = table
        self._built: dict[str, Check] = {}
        self._lock = threading.Lock()

    def __getitem__(self, kind: str) -> Check:
        with self._lock:
            if kind not in self._built:
                module, name = self._table[kind]
                self._built[kind] = getattr(importlib.import_module(module), name)()
            return self._built[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


CHECKS: Mapping[str, Check] = _Checks(TABLE)


def get_check(kind: str) -> Check:
    try:
        return CHECKS[kind]
    except KeyError:
        raise KeyError(f"unknown check kind {kind!r}") from None
