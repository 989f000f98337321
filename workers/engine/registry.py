"""The table of checks: every `kind` an audit config can name, and the engine module that runs
it. Adding a check means a schema (schemas/checks*.py), a module in workers/engine/checks/, a
row here and a section in the docs (docs/architecture.md, "Adding a check")."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from workers.engine.checks.adversarial import Adversarial
from workers.engine.checks.false_negative import FalseNegative
from workers.engine.checks.false_positive import FalsePositive
from workers.engine.checks.kernel import Kernel
from workers.engine.checks.lipschitz import Lipschitz
from workers.engine.checks.minimal_perturbation import MinimalPerturbation
from workers.engine.checks.more_samples import MoreSamples
from workers.engine.checks.random_noise import RandomNoise
from workers.engine.checks.universal import Universal
from workers.engine.checks.worst_case import WorstCase
from workers.engine.context import Check

CHECKS: Mapping[str, Check] = MappingProxyType(
    {
        "random_noise": RandomNoise(),
        "worst_case": WorstCase(),
        "lipschitz": Lipschitz(),
        "false_negative": FalseNegative(),
        "false_positive": FalsePositive(),
        "kernel": Kernel(),
        "more_samples": MoreSamples(),
        "adversarial": Adversarial(),
        "minimal_perturbation": MinimalPerturbation(),
        "universal": Universal(),
    }
)


def get_check(kind: str) -> Check:
    try:
        return CHECKS[kind]
    except KeyError:
        raise KeyError(f"unknown check kind {kind!r}") from None
