"""What the runner and the local CLI call. Everything else in the engine is internal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.audits import AuditConfig
from schemas.model_spec import ModelFormat, ModelSpec

ProgressFn = Callable[[float, str | None, str | None], None]  # fraction, check kind, message
ShardFn = Callable[[str, dict[str, Any]], None]  # shard_id, result


@dataclass
class Admission:
    ok: bool
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def admit_model(path: Path, fmt: ModelFormat, spec: ModelSpec, device: str = "cpu") -> Admission:
    """Screen, load and probe a model (in the sandbox). Never raises for a bad model."""
    raise NotImplementedError


def run_audit(
    model_path: Path,
    fmt: ModelFormat,
    spec: ModelSpec,
    config: AuditConfig,
    *,
    out_dir: Path,
    model_sha256: str,
    audit_id: str | None = None,
    model_id: str | None = None,
    base_dir: Path | None = None,
    completed_shards: dict[str, dict[str, Any]] | None = None,
    on_progress: ProgressFn | None = None,
    on_shard: ShardFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run an audit; write out_dir/report.json and artifacts; return the report dict.

    `base_dir` resolves relative `{"file": ...}` references. Shards already in
    `completed_shards` are not run again: a resumed audit gives the same report.
    """
    raise NotImplementedError
