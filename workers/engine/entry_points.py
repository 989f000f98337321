"""The engine's entry points: what the sandboxed runner and the local CLI call (admit a model,
plan an audit, run an audit or its shards). Everything else in the engine is internal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.audits import AuditConfig
from schemas.comparisons import ReferenceModel
from schemas.model_spec import ModelFormat, ModelSpec
from schemas.runner import JobModelFormat
from workers.engine.admission_result import Admission

__all__ = ["Admission", "ProgressFn", "ShardFn", "admit_model", "plan_audit", "run_audit"]

ProgressFn = Callable[[float, str | None, str | None], None]  # fraction, check kind, message
ShardFn = Callable[[str, dict[str, Any]], None]  # shard_id, result


def admit_model(path: Path, fmt: ModelFormat, spec: ModelSpec, device: str = "cpu") -> Admission:
    """Screen, load and probe a model (in the sandbox). Never raises for a bad model."""
    from workers.engine.model_loading import admit  # torch-heavy; only the runner gets here

    return admit(path, fmt, spec, device)


def run_audit(
    model_path: Path,
    fmt: JobModelFormat,
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
    only_shards: list[str] | None = None,
    loaded: dict[str, Any] | None = None,
    reference: ReferenceModel | None = None,
) -> dict[str, Any]:
    """Run an audit; write out_dir/report.json and artifacts; return the report dict.

    `base_dir` resolves relative `{"file": ...}` references. Shards already in
    `completed_shards` are not run again: a resumed audit gives the same report.
    Raises EngineInputError (inputs that cannot work together) and AuditCancelled.
    With `only_shards`, run only those shards (their results go to `on_shard`) and return
    `{"shards": [...]}` without merging. `loaded` (model key → model) keeps the loaded model
    between calls of one process. `reference` (`compare_with`): the model compared with, its
    `file` relative to `base_dir` (or absolute), audited as a second subject. A merge of
    stored shards that says every model is deterministic loads no model
    (workers.engine.audit.merge_stored_shards).

    Format `endpoint`: the model is queried through the process's query client
    (workers.engine.endpoint_model.install_query_client); only the checks of
    schemas.endpoints.QUERY_ONLY_CHECKS run (EngineInputError for the others).
    """
    from workers.engine.audit import (
        Reference,
        merge_stored_shards,
        resolve_device,
        run_audit_with_model,
    )
    from workers.engine.model_loading import load_model

    reference_identity = (
        None
        if reference is None
        else {
            "id": reference.model_id,
            "name": reference.spec.name,
            "sha256": reference.sha256,
            "format": reference.format,
            "spec": reference.spec.model_dump(mode="json"),
        }
    )
    if only_shards is None and completed_shards and fmt != "endpoint":
        # The finalising run of a distributed audit: when the stored shards hold all it
        # needs, it merges them without loading the model (an endpoint's run is left as it
        # was: its measurement's queries are counted in its ledger).
        merged = merge_stored_shards(
            spec,
            config,
            out_dir=out_dir,
            completed_shards=completed_shards,
            identity={
                "id": model_id,
                "name": spec.name,
                "sha256": model_sha256,
                "format": fmt,
                "spec": spec.model_dump(mode="json"),
            },
            audit_id=audit_id,
            base_dir=base_dir,
            reference=None
            if reference is None or reference_identity is None
            else (reference.spec, reference_identity),
            on_progress=on_progress,
        )
        if merged is not None:
            return merged
    device = resolve_device(config.device)
    wanted = [(model_path, fmt, spec, model_sha256)]
    if reference is not None:
        path = Path(reference.file)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        wanted.append((path, reference.format, reference.spec, reference.sha256))
    keys = [f"{path}:{sha256}:{device}" for path, _, _, sha256 in wanted]
    if loaded is not None:
        for stale in [key for key in loaded if key not in keys]:
            del loaded[stale]  # this audit's models only
    models = []
    for key, (path, model_format, model_spec, _) in zip(keys, wanted, strict=True):
        found = loaded.get(key) if loaded is not None else None
        if found is None:
            found = load_model(path, model_format, model_spec, str(device))
            if loaded is not None:
                loaded[key] = found
        models.append(found)
    model = models[0]
    compared = None
    if reference is not None and reference_identity is not None:
        compared = Reference(model=models[1], spec=reference.spec, identity=reference_identity)
    return run_audit_with_model(
        model,
        spec,
        config,
        out_dir=out_dir,
        model_sha256=model_sha256,
        model_name=spec.name,
        format=fmt,
        audit_id=audit_id,
        model_id=model_id,
        base_dir=base_dir,
        completed_shards=completed_shards,
        on_progress=on_progress,
        on_shard=on_shard,
        should_stop=should_stop,
        only_shards=only_shards,
        reference=compared,
    )


def plan_audit(
    spec: ModelSpec, config: AuditConfig, base_dir: Path | None, compare: bool = False
) -> list[dict[str, Any]]:
    """The shards of an audit (shard_id, check_index, kind, subject, start, stop), in the
    order the report merges them (with `compare`, a `reference` subject too). Raises
    EngineInputError when the audit cannot run."""
    from dataclasses import asdict

    from workers.engine.audit import plan_audit as plan

    return [asdict(shard) for shard in plan(spec, config, base_dir, compare)]
