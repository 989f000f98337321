"""The probe an audit runs before it is planned: the admission's probe again, through the
audit's own operator. It proves that a measurement model the admission could not probe (no
operator in its spec) runs on this audit's measurements, and it measures the model's time, from
which the worker derives the audit's default time limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from schemas.audits import AuditConfig
from schemas.model_spec import ModelFormat, ModelSpec
from workers.engine.model_loading import load_model, resolve_device
from workers.engine.operators import build_operator
from workers.engine.probe import probe_model


def probe_for_audit(
    model_path: Path, fmt: ModelFormat, spec: ModelSpec, config: AuditConfig, base_dir: Path
) -> dict[str, Any]:
    """The probe's facts (as the admission's). Raises ModelRejected when the model fails it."""
    device = resolve_device(config.device)
    model = load_model(model_path, fmt, spec, device)
    operator = None
    if spec.input == "measurement" and config.operator is not None:
        operator = build_operator(config.operator, spec.image_shape, device, base_dir)
    return probe_model(model, spec, device, operator)
