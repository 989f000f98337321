"""The admission probe: run a loaded model once on a deterministic input of the declared shape
and check what every audit relies on: a finite tensor of the right shape, and an input
gradient (every check differentiates through the model)."""

from __future__ import annotations

import time
from typing import Any

import torch

from schemas.model_spec import ModelSpec
from workers.engine.rejection import ModelRejected

PROBE_BATCH = 2
PROBE_SEED = 0


def probe_input(spec: ModelSpec, device: torch.device) -> torch.Tensor | None:
    """A batch drawn uniformly from the spec's value range, or None when the model takes raw
    measurements, whose shape depends on the operator that is chosen only at audit time."""
    if spec.input == "measurement":
        return None
    lo, hi = spec.value_range
    generator = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.rand((PROBE_BATCH, *spec.image_shape), generator=generator) * (hi - lo) + lo
    return x.to(device)


def expected_output_shape(spec: ModelSpec) -> list[int]:
    if spec.task == "classification":
        assert spec.num_classes is not None  # the spec's validator requires it
        return [PROBE_BATCH, spec.num_classes]
    return [PROBE_BATCH, *spec.image_shape]


def probe_model(model: torch.nn.Module, spec: ModelSpec, device: torch.device) -> dict[str, Any]:
    """Run the probe; raise ModelRejected with the reason, or return facts for the admission."""
    x = probe_input(spec, device)
    if x is None:
        return {
            "probe": "skipped",
            "probe_note": "the model takes measurements, whose shape depends on the audit's "
            "operator: shapes are checked when an audit runs",
        }
    x.requires_grad_(True)
    started = time.perf_counter()
    try:
        output = model(x)
    except Exception as exc:  # noqa: BLE001 - any failure of uploaded code is a rejection
        raise ModelRejected(
            f"the model fails on an input of shape {list(x.shape)}: {_message(exc)}"
        ) from exc
    _check_output(output, spec)
    gradient_note = _check_gradient(output, x)
    info: dict[str, Any] = {
        "probe": "passed",
        "probe_seconds": round(time.perf_counter() - started, 6),
        "input_shape": list(x.shape),
        "output_shape": list(output.shape),
    }
    if gradient_note:
        info["probe_note"] = gradient_note
    return info


def _check_output(output: object, spec: ModelSpec) -> None:
    if not isinstance(output, torch.Tensor):
        raise ModelRejected(
            f"the model returns {type(output).__name__}, not a tensor; wrap it so that "
            "forward returns one tensor"
        )
    expected = expected_output_shape(spec)
    if list(output.shape) != expected:
        what = "num_classes" if spec.task == "classification" else "image_shape"
        declared = spec.num_classes if spec.task == "classification" else list(spec.image_shape)
        raise ModelRejected(
            f"output shape {list(output.shape)} does not match the spec's {what} {declared} "
            f"(expected {expected} for a batch of {PROBE_BATCH})"
        )
    if not output.is_floating_point():
        raise ModelRejected(f"the model's output has dtype {output.dtype}, not a floating type")
    if not bool(torch.isfinite(output).all()):
        raise ModelRejected("the model's output contains NaN or infinite values on the probe input")


def _check_gradient(output: torch.Tensor, x: torch.Tensor) -> str | None:
    """Raise when the output cannot be differentiated with respect to the input; return a note
    when the gradient exists but is zero (the audit can run, but will find little)."""
    if not output.requires_grad:
        raise ModelRejected(
            "the model's output does not depend differentiably on its input (no gradient: "
            "detached output or no_grad inside the model); the audit needs input gradients"
        )
    try:
        (gradient,) = torch.autograd.grad(output.square().sum(), x, allow_unused=True)
    except RuntimeError as exc:
        raise ModelRejected(f"the model cannot be differentiated: {_message(exc)}") from exc
    if gradient is None:
        raise ModelRejected("the model's output does not depend on its input (no gradient)")
    if not bool(torch.isfinite(gradient).all()):
        raise ModelRejected("the model's input gradient contains NaN or infinite values")
    if float(gradient.abs().max()) == 0.0:
        return "the input gradient is zero at the probe input"
    return None


def _message(exc: BaseException) -> str:
    # TorchScript errors end with the Python-level message after a traceback of the graph
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(exc).__name__


def parameter_count(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
