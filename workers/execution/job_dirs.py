"""Job directories: what the sandboxed runner sees, and what is taken back from it.

A job (an admission, a plan, shards, a finalising step: what one Celery task's step asks of one
runner child) runs in a job directory (`<jobs_dir>/<audit or model id>-<attempt>`), which holds
copies, never links, of everything the runner reads: the model, the uploaded arrays (rewritten to
`{"file": ...}` references inside the directory), the shards already finished, and `job.json`
(the runner's request, schemas.runner.RunnerRequest). The runner writes
`shards/` and `out/`; `out/` is imported into the artifact store afterwards.
"""

from __future__ import annotations

import json
import mimetypes
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.audits import AuditConfig, AuditRequest
from schemas.comparisons import ReferenceModel
from schemas.endpoints import ENDPOINT_FORMAT, EndpointView, endpoint_identity_bytes
from schemas.model_spec import ModelSpec
from schemas.runner import (
    JOB_FILE,
    OUT_DIR,
    PLAN_FILE,
    SHARDS_DIR,
    STOP_FILE,
    RunnerPlan,
    RunnerRequest,
)
from service.db.stored_request import StoredRequestInvalid, stored_request
from service.db.tables import Artifact, Audit, AuditShard, Dataset, Model
from service.settings import Settings
from service.storage.stores import artifact_store, sha256_file
from workers.execution.blob_cache import BlobMissing, worker_blobs

INPUTS_DIR = "inputs"
MODEL_EXTENSIONS = {
    "torchscript": ".pt",
    "export": ".pt2",
    "safetensors": ".safetensors",
    "onnx": ".onnx",
}
DATASET_EXTENSIONS = {"npy": ".npy", "npz": ".npz", "png_zip": ".zip"}
SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobInputError(ValueError):
    """The audit refers to something that cannot be given to the runner (a 422 problem)."""


def job_dir_for(settings: Settings, item_id: str, attempt: int) -> Path:
    return settings.jobs_dir / f"{item_id}-{attempt}"


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _request(audit: Audit) -> AuditRequest:
    """The audit's stored request, typed; one that no longer validates cannot be run (422)."""
    try:
        return stored_request(audit.request, audit_id=audit.id)
    except StoredRequestInvalid as exc:
        raise JobInputError(str(exc)) from exc


def _copy_model(settings: Settings, model: Model, job_dir: Path, stem: str = "model") -> str:
    if model.format == ENDPOINT_FORMAT:
        # No file: the endpoint's identity (its sha256 is the model's), which the runner's
        # engine does not read; its queries go through the worker (workers.execution.query_relay).
        name = stem + ".endpoint.json"
        view = EndpointView.model_validate(model.endpoint)
        (job_dir / name).write_bytes(endpoint_identity_bytes(view))
        return name
    name = stem + MODEL_EXTENSIONS.get(model.format, "")
    try:
        worker_blobs(settings).copy_to(model.sha256, job_dir / name)
    except BlobMissing:
        raise JobInputError(
            f"the file of model {model.id} is missing from the blob store"
        ) from None
    return name


def _copy_reference(
    session: Session, settings: Settings, audit: Audit, job_dir: Path
) -> ReferenceModel | None:
    """The model of the request's `compare_with`, copied as `reference.<ext>` (None without)."""
    compare_with = _request(audit).compare_with
    if compare_with is None:
        return None
    model = session.get(Model, compare_with.model_id)
    if model is None or model.tenant_id != audit.tenant_id or model.status != "ready":
        raise JobInputError(
            f"compare_with.model_id: model {compare_with.model_id!r} is not a ready model"
        )
    return ReferenceModel(
        file=_copy_model(settings, model, job_dir, stem="reference"),
        format=model.format,
        sha256=model.sha256,
        spec=ModelSpec.model_validate(model.spec),
        model_id=model.id,
    )


def _copy_dataset(
    session: Session, settings: Settings, tenant_id: str, dataset_id: str, job_dir: Path, name: str
) -> str:
    """Copy an uploaded dataset of the tenant into inputs/; its path relative to the job dir."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id or dataset.deleted_at is not None:
        raise JobInputError(f"dataset {dataset_id} does not exist")
    relative = f"{INPUTS_DIR}/{name}{DATASET_EXTENSIONS.get(dataset.format, '')}"
    (job_dir / INPUTS_DIR).mkdir(exist_ok=True)
    try:
        worker_blobs(settings).copy_to(dataset.sha256, job_dir / relative)
    except BlobMissing:
        raise JobInputError(
            f"the file of dataset {dataset_id} is missing from the blob store"
        ) from None
    return relative


def _labels_key(session: Session, dataset_id: str) -> str | None:
    """The labels array recorded at upload (classifier datasets), if any."""
    dataset = session.get(Dataset, dataset_id)
    labels = (dataset.shape or {}).get("labels") if dataset is not None else None
    return labels["key"] if isinstance(labels, dict) else None


def localise_config(
    session: Session, settings: Settings, audit: Audit, job_dir: Path
) -> AuditConfig:
    """The audit's config with every uploaded dataset or array replaced by a copied file: the
    stored document (checked by the typed read first) rewritten, then validated as the engine's
    AuditConfig."""
    _request(audit)
    request = dict(audit.request)
    # AuditRequest fields the engine does not read (compare_with: RunnerRequest.reference)
    for service_only in ("model_id", "priority", "compare_with"):
        request.pop(service_only, None)
    dataset = request.get("dataset")
    if isinstance(dataset, dict) and "dataset_id" in dataset:
        path = _copy_dataset(
            session, settings, audit.tenant_id, dataset["dataset_id"], job_dir, "dataset"
        )
        request["dataset"] = {
            "file": path,
            "key": dataset.get("key"),
            "labels_key": _labels_key(session, dataset["dataset_id"]),
        }
    operator = request.get("operator")
    if isinstance(operator, dict):
        operator = dict(operator)
        for field_name, value in operator.items():
            if isinstance(value, dict) and "dataset_id" in value:
                path = _copy_dataset(
                    session, settings, audit.tenant_id, value["dataset_id"], job_dir, field_name
                )
                operator[field_name] = {"file": path, "key": value.get("key")}
        request["operator"] = operator
    try:
        return AuditConfig.model_validate(request)
    except ValueError as exc:
        raise JobInputError(f"the stored audit request is not valid: {exc}") from exc


def _write_shards(session: Session, audit_id: str, job_dir: Path) -> int:
    shard_dir = job_dir / SHARDS_DIR
    shard_dir.mkdir(exist_ok=True)
    count = 0
    finished = select(AuditShard).where(
        AuditShard.audit_id == audit_id, AuditShard.status == "done", AuditShard.result.is_not(None)
    )
    for shard in session.scalars(finished):
        if SHARD_ID.match(shard.shard_id):
            (shard_dir / f"{shard.shard_id}.json").write_text(json.dumps(shard.result))
            count += 1
    return count


def _write_job(job_dir: Path, job: RunnerRequest) -> None:
    (job_dir / JOB_FILE).write_text(job.model_dump_json(by_alias=True), encoding="utf-8")


def materialise_audit_job(
    session: Session,
    settings: Settings,
    audit: Audit,
    model: Model,
    kind: Literal["plan", "audit", "shards"] = "audit",
    job_dir: Path | None = None,
) -> Path:
    """A fresh job directory for a `plan` or `audit` (finalising) attempt, with the finished
    shards; or, for `shards`, one a worker keeps for the shards of this audit it runs
    (workers.execution.job_dir_cache), without shards: each run names its own in job.json."""
    job_dir = _fresh_dir(job_dir or job_dir_for(settings, audit.id, audit.attempts))
    try:
        model_file = _copy_model(settings, model, job_dir)
        reference = _copy_reference(session, settings, audit, job_dir)
        config = localise_config(session, settings, audit, job_dir)
        if kind == "audit":
            _write_shards(session, audit.id, job_dir)
        else:
            (job_dir / SHARDS_DIR).mkdir()
        (job_dir / OUT_DIR).mkdir()
        _write_job(
            job_dir,
            RunnerRequest(
                kind=kind,
                model_file=model_file,
                model_format=model.format,
                model_sha256=model.sha256,
                spec=ModelSpec.model_validate(model.spec),
                audit_id=audit.id,
                model_id=model.id,
                config=config,
                reference=reference,
                archive_limits=settings.archive_limits,
            ),
        )
    except BaseException:
        remove_job_dir(job_dir)
        raise
    return job_dir


def write_shard_job(job_dir: Path, shard_ids: list[str]) -> None:
    """Point a cached `shards` job directory at the next shards to run, clearing what the
    previous run left (its results are stored by then) and any stop request."""
    job = RunnerRequest.model_validate_json((job_dir / JOB_FILE).read_text(encoding="utf-8"))
    for name in (SHARDS_DIR, OUT_DIR):
        shutil.rmtree(job_dir / name, ignore_errors=True)
        (job_dir / name).mkdir()
    (job_dir / STOP_FILE).unlink(missing_ok=True)
    _write_job(job_dir, job.model_copy(update={"kind": "shards", "shard_ids": shard_ids}))


def read_plan(job_dir: Path) -> RunnerPlan | None:
    """The plan a `plan` child wrote; None when it is missing or malformed."""
    path = job_dir / OUT_DIR / PLAN_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return RunnerPlan.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def reference_sha256(session: Session, audit: Audit) -> str | None:
    """The sha256 of the audit's `compare_with` model, from the database (None without)."""
    compare_with = _request(audit).compare_with
    if compare_with is None:
        return None
    model = session.get(Model, compare_with.model_id)
    return None if model is None else model.sha256


def model_file_intact(job_dir: Path, sha256: str, reference: str | None = None) -> bool:
    """The model copy in a kept job directory still has the admitted bytes (a child can write
    into its job directory, so a kept copy is checked before it is reused)."""
    job = RunnerRequest.model_validate_json((job_dir / JOB_FILE).read_text(encoding="utf-8"))
    copies = [(job_dir / job.model_file, sha256)]
    if (job.reference is None) != (reference is None):
        return False
    if job.reference is not None and reference is not None:  # compare_with: that copy too
        copies.append((job_dir / job.reference.file, reference))
    return all(
        path.is_file() and not path.is_symlink() and sha256_file(path) == expected
        for path, expected in copies
    )


def materialise_admission_job(settings: Settings, model: Model, attempt: int) -> Path:
    job_dir = _fresh_dir(job_dir_for(settings, model.id, attempt))
    try:
        model_file = _copy_model(settings, model, job_dir)
        _write_job(
            job_dir,
            RunnerRequest(
                kind="admit",
                model_file=model_file,
                model_format=model.format,
                model_sha256=model.sha256,
                spec=ModelSpec.model_validate(model.spec),
                model_id=model.id,
                archive_limits=settings.archive_limits,
            ),
        )
    except BaseException:
        remove_job_dir(job_dir)
        raise
    return job_dir


def read_shard(job_dir: Path, shard_id: str) -> dict[str, Any] | None:
    """A finished shard's result as the runner wrote it; None if the id or file is not sane."""
    if not SHARD_ID.match(shard_id):
        return None
    path = job_dir / SHARDS_DIR / f"{shard_id}.json"
    if path.is_symlink() or not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    return result if isinstance(result, dict) else None


def import_outputs(session: Session, settings: Settings, audit_id: str, job_dir: Path) -> list[str]:
    """Copy out/ into the artifact store and record an Artifact row per file (replacing older
    rows of the same name, so a retried audit keeps one row per name). Does not commit."""
    store = artifact_store(settings)
    out_dir = job_dir / OUT_DIR
    files = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    names: list[str] = []
    for stored in store.import_files(audit_id, files):
        media_type = mimetypes.guess_type(stored.name)[0] or "application/octet-stream"
        session.merge(
            Artifact(
                audit_id=audit_id,
                name=stored.name,
                media_type=media_type,
                sha256=stored.sha256,
                size_bytes=stored.size,
                path=stored.key,
            )
        )
        names.append(stored.name)
    return names


def remove_job_dir(job_dir: Path) -> None:
    shutil.rmtree(job_dir, ignore_errors=True)
