"""The outcome of admitting a model (screen, load, probe): built by
workers.engine.model_loading.admit, returned by workers.engine.entry_points.admit_model.
Torch-free, so the entry points can name it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Admission:
    ok: bool
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
