"""Registers the classifier checks (and `universal`) when the checks package is imported."""

from __future__ import annotations

from workers.engine.checks.adversarial import AdversarialRunner
from workers.engine.checks.minimal_perturbation import MinimalPerturbationRunner
from workers.engine.checks.universal import UniversalRunner
from workers.engine.registry import CHECKS, register

for _runner in (AdversarialRunner(), MinimalPerturbationRunner(), UniversalRunner()):
    if _runner.kind not in CHECKS:
        register(_runner)
