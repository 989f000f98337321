"""Admit an endpoint model: probe its endpoint from the worker (docs/models.md, "Endpoint
models").

There is no uploaded code to contain, so the probe runs in the worker process itself, with the
Open Inference Protocol client (workers.shared.inference_protocol: the egress rules, limits,
retries and breaker hold here as in audits). In order:

1. **metadata**: the model's input and output tensors (the named ones, or its only ones); the
   input is `FP32` (the client sends FP32 tensors) and its batch dimension is variable (-1), or
   fixed at 1 with `limits.max_batch` 1;
2. **shapes** against the spec: the input is one image (`image_shape`) for input `image` or
   `adjoint`, `measurement_shape` for input `measurement` when the spec names it (else the
   first audit's probe checks it); the output is `image_shape` (reconstruction) or
   `[num_classes]` (classification). A variable (-1) dimension matches any size;
3. **answers**: the model's ready endpoint, then PROBE_BATCH seeded inputs drawn uniformly in
   the spec's value range: every output finite and of the expected shape;
4. **value range**: the outputs' smallest and largest value (`output_range`) and, for a
   reconstruction, the share of output values inside the spec's value range;
5. **determinism**: the same inputs again; the largest ‖Ψ₁(y) − Ψ₂(y)‖ / ‖Ψ₁(y)‖ over the
   inputs is `output_spread`, and above STOCHASTIC_TOLERANCE (as for uploads) the model is
   `stochastic`: the checks then average over repeated queries;
6. **latency**: p50 and p99 of the probe's requests, and the probe's query ledger.

A failure at any step rejects the model with the reason; the secret never enters a reason.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from sqlalchemy import update
from sqlalchemy.orm import Session

from schemas.endpoints import EndpointView
from schemas.model_spec import ModelSpec
from schemas.runner import PROBE_BATCH
from service.db.tables import Model
from service.settings import Settings
from service.signing.endpoint_secrets import SecretUnreadable, decrypt
from workers.shared.inference_protocol import (
    EndpointError,
    InferenceClient,
    ModelMetadata,
    RetryPolicy,
    TensorInfo,
)
from workers.shared.query_ledger import QueryLedger

log = logging.getLogger(__name__)

PROBE_SEED = 0
# As the sandbox's probe of an uploaded model (workers.engine.probe.STOCHASTIC_TOLERANCE).
STOCHASTIC_TOLERANCE = 1e-5
# The admission's retries: fewer than an audit's, a registration should be answered quickly.
ADMISSION_RETRY = RetryPolicy(attempts=3, backoff_seconds=0.5, max_retry_after_seconds=10.0)


class EndpointRejected(Exception):
    """The endpoint does not serve the model the spec describes; the message says why."""


def client_for(
    settings: Settings, model: Model, ledger: QueryLedger | None = None, **options: Any
) -> InferenceClient:
    """A client of the model's endpoint, with its limits, its decrypted secret and the
    deployment's egress allow-list."""
    view = EndpointView.model_validate(model.endpoint)
    auth = None
    if view.auth_header is not None and model.endpoint_secret is not None:
        auth = (view.auth_header, decrypt(settings, model.id, model.endpoint_secret))
    return InferenceClient(
        view,
        limits=view.limits,
        auth=auth,
        allow=settings.endpoint_allow_list,
        ledger=ledger,
        **options,
    )


def input_shape(spec: ModelSpec) -> list[int] | None:
    """One input's shape as the spec says it, None where only an operator could say."""
    if spec.input in ("image", "adjoint"):
        return list(spec.image_shape)
    return list(spec.measurement_shape) if spec.measurement_shape is not None else None


def output_shape(spec: ModelSpec) -> list[int]:
    if spec.task == "classification":
        assert spec.num_classes is not None  # the spec's validator requires it
        return [spec.num_classes]
    return list(spec.image_shape)


def _pick(tensors: tuple[TensorInfo, ...], name: str | None, what: str) -> TensorInfo:
    if name is not None:
        for tensor in tensors:
            if tensor.name == name:
                return tensor
        names = ", ".join(t.name for t in tensors) or "none"
        raise EndpointRejected(f"the model has no {what} {name!r} (it has: {names})")
    if len(tensors) != 1:
        raise EndpointRejected(
            f"the model has {len(tensors)} {what}s: name the one to audit (`{what}_name`)"
        )
    return tensors[0]


def _matches(declared: tuple[int, ...], wanted: list[int]) -> bool:
    return len(declared) == len(wanted) and all(
        d in (-1, w) for d, w in zip(declared, wanted, strict=True)
    )


def check_metadata(meta: ModelMetadata, view: EndpointView, spec: ModelSpec) -> dict[str, Any]:
    """Steps 1 and 2: the tensors against the spec; what was found, or EndpointRejected."""
    tensor_in = _pick(meta.inputs, view.input_name, "input")
    tensor_out = _pick(meta.outputs, view.output_name, "output")
    if tensor_in.datatype != "FP32":
        raise EndpointRejected(
            f"the input {tensor_in.name!r} is {tensor_in.datatype}: audits send FP32 tensors"
        )
    for tensor, what in ((tensor_in, "input"), (tensor_out, "output")):
        if not tensor.shape:
            raise EndpointRejected(f"the {what} {tensor.name!r} has no dimensions")
    batch = tensor_in.shape[0]
    if batch != -1 and not (batch == 1 and view.limits.max_batch == 1):
        raise EndpointRejected(
            f"the input's batch dimension is fixed at {batch}: audits send batches of any size "
            "up to limits.max_batch (serve the model with a variable batch dimension, -1, or "
            "register it with limits.max_batch 1 if it takes one input at a time)"
        )
    wanted_in = input_shape(spec)
    if wanted_in is not None and not _matches(tensor_in.shape[1:], wanted_in):
        raise EndpointRejected(
            f"the input {tensor_in.name!r} has shape {list(tensor_in.shape)}, the spec's "
            f"input `{spec.input}` is one of shape {wanted_in} (with the batch first: "
            f"[-1, {', '.join(map(str, wanted_in))}])"
        )
    wanted_out = output_shape(spec)
    if not _matches(tensor_out.shape[1:], wanted_out):
        raise EndpointRejected(
            f"the output {tensor_out.name!r} has shape {list(tensor_out.shape)}, the spec's "
            f"{spec.task} model gives {wanted_out} per input"
        )
    return {
        "platform": meta.platform,
        "versions": list(meta.versions),
        "input": {
            "name": tensor_in.name,
            "datatype": tensor_in.datatype,
            "shape": list(tensor_in.shape),
        },
        "output": {
            "name": tensor_out.name,
            "datatype": tensor_out.datatype,
            "shape": list(tensor_out.shape),
        },
    }


def output_spread(first: np.ndarray, second: np.ndarray) -> float:
    """max over the batch of ‖first − second‖ / ‖first‖ (the absolute difference where the
    first is zero), as workers.engine.probe.output_spread."""
    a = first.reshape(len(first), -1).astype(np.float64)
    b = second.reshape(len(second), -1).astype(np.float64)
    difference = np.linalg.norm(a - b, axis=1)
    size = np.linalg.norm(a, axis=1)
    relative = np.where(size > 0, difference / np.where(size > 0, size, 1.0), difference)
    return float(relative.max()) if relative.size else 0.0


def probe_endpoint(client: InferenceClient, spec: ModelSpec) -> dict[str, Any]:
    """Steps 1–6 with `client`; the admission's facts, or EndpointRejected / EndpointError."""
    view = EndpointView.model_validate(client.target.model_dump())
    found = check_metadata(client.metadata(), view, spec)
    if not client.ready():
        raise EndpointRejected("the model's ready endpoint does not answer 200: it is not ready")
    shape = input_shape(spec)
    if shape is None:
        declared = found["input"]["shape"][1:]
        if any(d < 1 for d in declared):
            found["probe"] = "deferred: the input's shape waits for the first audit's operator"
            return found
        shape = declared
    lo, hi = spec.value_range
    rng = np.random.default_rng(PROBE_SEED)
    x = rng.uniform(lo, hi, size=(PROBE_BATCH, *shape)).astype(np.float32)
    expect = output_shape(spec)
    first = client.infer(x, scope=("admission", None), expect=expect)
    second = client.infer(x, scope=("admission", None), expect=expect)
    spread = output_spread(first, second)
    found["output_range"] = [float(first.min()), float(first.max())]
    if spec.task == "reconstruction":
        inside = (first >= lo) & (first <= hi)
        found["output_in_value_range"] = float(f"{inside.mean():.6g}")
    found["stochastic"] = spread > STOCHASTIC_TOLERANCE
    found["output_spread"] = float(f"{spread:.6g}") if math.isfinite(spread) else None
    ledger = client.ledger.to_json()
    found["latency_seconds"] = ledger["latency_seconds"]
    found["queries"] = {k: ledger[k] for k in ("sent", "answered", "requests", "failures")}
    return found


def _set_status(session: Session, model_id: str, **values: Any) -> bool:
    changed = session.execute(
        update(Model)
        .where(Model.id == model_id, Model.status == "validating")
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return changed.rowcount == 1  # type: ignore[attr-defined]


def admit_endpoint(
    model: Model, *, settings: Settings, session: Session, retry: RetryPolicy | None = None
) -> str:
    """Probe the endpoint model and write `ready` or `rejected` with the reason."""
    spec = ModelSpec.model_validate(model.spec)
    try:
        with client_for(settings, model, retry=retry or ADMISSION_RETRY) as client:
            facts = probe_endpoint(client, spec)
    except (EndpointRejected, EndpointError, SecretUnreadable) as exc:
        reason = f"the endpoint failed its probe: {exc}"
        log.info("endpoint model %s rejected: %s", model.id, reason)
        _set_status(session, model.id, status="rejected", reason=reason)
        return "rejected"
    except Exception as exc:  # noqa: BLE001 - a budget or a bug: never left validating
        reason = f"the endpoint could not be probed: {type(exc).__name__}: {exc}"
        log.exception("endpoint model %s: probe failed", model.id)
        _set_status(session, model.id, status="rejected", reason=reason)
        return "rejected"
    _set_status(
        session,
        model.id,
        status="ready",
        reason=None,
        admission_info={"endpoint": facts, **_flags(facts)},
    )
    return "ready"


def _flags(facts: dict[str, Any]) -> dict[str, Any]:
    """What model_resource reads of any model's admission (stochastic, output_spread)."""
    return {k: facts[k] for k in ("stochastic", "output_spread") if k in facts}
