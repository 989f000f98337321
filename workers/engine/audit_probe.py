"""The probe an audit runs before it is planned: the admission's probe again, through the
audit's own operator. It proves that a measurement model the admission could not probe (no
operator in its spec) runs on this audit's measurements, and it measures the model's time, from
which the worker derives the audit's default time limit.

An endpoint model gives no gradients: its probe is forward passes only (`probe_endpoint`), the
same input, output checks and timings, without the input gradient."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from schemas.audits import AuditConfig
from schemas.model_spec import ModelSpec
from schemas.runner import PROBE_BATCH, JobModelFormat
from workers.engine.endpoint_model import is_query_only, query_scope
from workers.engine.model_loading import load_model, resolve_device
from workers.engine.operators import LinearOperator, build_operator
from workers.engine.probe import expected_output_shape, probe_input, probe_model, stochasticity
from workers.engine.rejection import ModelRejected
from workers.shared.errors import EndpointQueryFailed


def probe_for_audit(
    model_path: Path, fmt: JobModelFormat, spec: ModelSpec, config: AuditConfig, base_dir: Path
) -> dict[str, Any]:
    """The probe's facts (as the admission's). Raises ModelRejected when the model fails it."""
    device = resolve_device(config.device)
    model = load_model(model_path, fmt, spec, device)
    operator = None
    if spec.input == "measurement" and config.operator is not None:
        operator = build_operator(config.operator, spec.image_shape, device, base_dir)
    if is_query_only(model):
        return probe_endpoint(model, spec, device, operator)
    return probe_model(model, spec, device, operator)


def probe_endpoint(
    model: torch.nn.Module,
    spec: ModelSpec,
    device: torch.device,
    operator: LinearOperator | None = None,
) -> dict[str, Any]:
    """`probe_model` for a model that answers queries only: two calls on the probe's input
    without gradients (queries charged to ("probe", None)), their output's shape and
    finiteness checked, the second call timed. Raises ModelRejected with the reason."""
    x, source = probe_input(spec, device, operator)
    if x is None:
        return {"probe": "deferred", "probe_note": source}
    outputs, seconds = [], []
    with torch.no_grad(), query_scope(model, "probe"):
        for call in range(2):
            started = time.perf_counter()
            try:
                output = model(x)
            except EndpointQueryFailed:
                raise  # the endpoint could not answer: its own problem, not a wrong answer
            except Exception as exc:  # noqa: BLE001 - a wrong answer fails the probe
                raise ModelRejected(
                    f"the endpoint fails on an input of shape {list(x.shape)} "
                    f"(call {call + 1}): {type(exc).__name__}: {str(exc)[:500]}"
                ) from exc
            seconds.append(time.perf_counter() - started)
            _check_output(output, spec)
            outputs.append(output)
    return {
        "probe": "passed",
        "probe_input": source,
        "probe_seconds": round(seconds[0], 6),
        "probe_warm_seconds": round(seconds[1], 6),
        "input_shape": list(x.shape),
        "output_shape": list(outputs[0].shape),
        **stochasticity(outputs[0], outputs[1]),
    }


def _check_output(output: object, spec: ModelSpec) -> None:
    if not isinstance(output, torch.Tensor):
        raise ModelRejected(f"the endpoint answers {type(output).__name__}, not a tensor")
    expected = expected_output_shape(spec)
    if list(output.shape) != expected:
        raise ModelRejected(
            f"the endpoint's answer has shape {list(output.shape)}, not {expected} "
            f"(a batch of {PROBE_BATCH})"
        )
    if not bool(torch.isfinite(output).all()):
        raise ModelRejected("the endpoint's answer contains NaN or infinite values")
