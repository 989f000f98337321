"""The admission probe: run a loaded model once on a deterministic input of the declared shape
and check what every audit relies on: a finite tensor of the right shape, and an input
gradient (every check differentiates through the model). It runs the model a second time on the
same input (timed, for the watchdog) without reseeding torch's generator in between, so the two
outputs tell whether the model is stochastic (a sampler: dropout at inference, noise inputs,
diffusion sampling): see `stochasticity` and docs/models.md."""

from __future__ import annotations

import time
from typing import Any

import torch

from schemas.common import FileArray, UploadedArray
from schemas.model_spec import ModelSpec
from schemas.runner import PROBE_BATCH
from workers.engine.operators import LinearOperator, build_operator
from workers.engine.rejection import ModelRejected
from workers.shared.errors import EngineInputError, is_out_of_memory

PROBE_SEED = 0
# A model whose two outputs at the same input differ by more than this, relative to the first
# (‖Ψ₁(y) − Ψ₂(y)‖ / ‖Ψ₁(y)‖, the largest over the probe's inputs), is stochastic. Float
# nondeterminism of a deterministic model (reduction order, nondeterministic GPU kernels) stays
# near 1e-7 in float32; a sampler's spread is its noise level over its output's size.
STOCHASTIC_TOLERANCE = 1e-5


def probe_input(
    spec: ModelSpec, device: torch.device, operator: LinearOperator | None = None
) -> tuple[torch.Tensor | None, str]:
    """The probe's input batch and how it was made, or (None, why) when nothing tells the
    shape of a measurement model's input.

    Images are drawn uniformly from the spec's value range. A measurement model gets A(x) of such
    images through `operator` (the audit's) or the spec's own `operator`, else noise of the spec's
    `measurement_shape`; the adjoint convention already takes image-shaped inputs."""
    lo, hi = spec.value_range
    generator = torch.Generator().manual_seed(PROBE_SEED)
    images = torch.rand((PROBE_BATCH, *spec.image_shape), generator=generator) * (hi - lo) + lo
    if spec.input != "measurement":
        return images.to(device), "image"
    if operator is None and spec.operator is not None:
        operator = _spec_operator(spec, device)
        if operator is None:
            return None, (
                "the spec's operator refers to uploaded arrays, which exist only in an audit: "
                "the first audit probes the model through its operator before any check"
            )
    if operator is not None:
        with torch.no_grad():
            return operator.A(images.to(device)), "operator"
    if spec.measurement_shape is not None:
        noise = torch.rand((PROBE_BATCH, *spec.measurement_shape), generator=generator)
        return (noise * (hi - lo) + lo).to(device), "measurement_shape"
    return None, (
        "the model takes measurements and its spec names neither `operator` nor "
        "`measurement_shape`: the first audit probes it through the audit's operator before "
        "any check"
    )


def _spec_operator(spec: ModelSpec, device: torch.device) -> LinearOperator | None:
    """The spec's operator, or None when it needs arrays that only an audit uploads."""
    assert spec.operator is not None
    arrays = (FileArray, UploadedArray)
    if any(isinstance(value, arrays) for value in spec.operator.__dict__.values()):
        return None
    try:
        return build_operator(spec.operator, spec.image_shape, device)
    except EngineInputError as exc:
        raise ModelRejected(f"the spec's operator cannot be built: {exc}") from exc


def expected_output_shape(spec: ModelSpec) -> list[int]:
    if spec.task == "classification":
        assert spec.num_classes is not None  # the spec's validator requires it
        return [PROBE_BATCH, spec.num_classes]
    return [PROBE_BATCH, *spec.image_shape]


def probe_model(
    model: torch.nn.Module,
    spec: ModelSpec,
    device: torch.device,
    operator: LinearOperator | None = None,
) -> dict[str, Any]:
    """Run the probe; raise ModelRejected with the reason, or return facts for the admission.

    `operator`: the audit's, when an audit probes a model its admission could not."""
    x, source = probe_input(spec, device, operator)
    if x is None:
        return {"probe": "deferred", "probe_note": source}
    x.requires_grad_(True)
    started = time.perf_counter()
    try:
        output = model(x)
    except Exception as exc:  # noqa: BLE001 - any failure of uploaded code is a rejection
        if is_out_of_memory(exc):
            raise ModelRejected(
                f"the model ran out of memory on a probe of {PROBE_BATCH} inputs of shape "
                f"{list(x.shape[1:])} (the sandbox's memory limit): {_message(exc)}"
            ) from exc
        raise ModelRejected(
            f"the model fails on an input of shape {list(x.shape)}: {_message(exc)}"
        ) from exc
    _check_output(output, spec)
    gradient_note = _check_gradient(output, x)
    cold_seconds = time.perf_counter() - started
    warm_seconds, second = _warm_call(model, x)
    info: dict[str, Any] = {
        "probe": "passed",
        "probe_input": source,
        "probe_seconds": round(cold_seconds, 6),
        "probe_warm_seconds": round(warm_seconds, 6),
        "input_shape": list(x.shape),
        "output_shape": list(output.shape),
        **stochasticity(output.detach(), second),
    }
    if gradient_note:
        info["probe_note"] = gradient_note
    return info


def _warm_call(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The same forward and input gradient again, timed, and its output: the first call also
    pays one-off costs (TorchScript profiles and optimises its first calls, allocators warm
    up), so this is what a call of the model costs. The worker's watchdog scales its allowance
    from it (workers.execution.watchdog). torch's generator is not reseeded between the two
    calls: a sampler draws anew, which `stochasticity` measures."""
    x = x.detach().requires_grad_(True)
    started = time.perf_counter()
    try:
        output = model(x)
        torch.autograd.grad(output.square().sum(), x, allow_unused=True)
    except Exception as exc:  # noqa: BLE001 - any failure of uploaded code is a rejection
        if is_out_of_memory(exc):
            raise ModelRejected(
                f"the model ran out of memory on a second probe of {PROBE_BATCH} inputs "
                f"(the sandbox's memory limit): {_message(exc)}"
            ) from exc
        raise ModelRejected(f"the model fails on a second probe call: {_message(exc)}") from exc
    seconds = time.perf_counter() - started
    if not isinstance(output, torch.Tensor):
        raise ModelRejected("the model returns no tensor on a second probe call")
    return seconds, output.detach()


def output_spread(first: torch.Tensor, second: torch.Tensor) -> float:
    """max over the batch of ‖first − second‖ / ‖first‖ (per input; the absolute difference
    where the first output is zero). 0 for identical outputs; inf when they differ in shape or
    either is not finite."""
    if first.shape != second.shape:
        return float("inf")
    a = first.detach().flatten(1).double()
    b = second.detach().flatten(1).double()
    difference = (a - b).norm(dim=1)
    size = a.norm(dim=1)
    relative = torch.where(size > 0, difference / torch.where(size > 0, size, 1.0), difference)
    spread = float(relative.max()) if relative.numel() else 0.0
    return spread if spread == spread else float("inf")  # NaN: not finite


def stochasticity(first: torch.Tensor, second: torch.Tensor) -> dict[str, Any]:
    """`{"stochastic", "output_spread"}` from two outputs of the model at the same input
    (drawn with different states of torch's generator). The spread is kept to 6 significant
    digits: a deterministic model's is 0.0 on the CPU."""
    spread = output_spread(first, second)
    return {
        "stochastic": spread > STOCHASTIC_TOLERANCE,
        "output_spread": float(f"{spread:.6g}") if spread != float("inf") else None,
    }


# Calls of the model the audit makes at most, at the probe's input, before it calls a model
# deterministic: two calls miss a sampler whose draws often agree (a structure planted with
# probability 0.2 on each of 2 inputs: both calls agree with probability 0.8⁴ ≈ 0.41); 16
# calls miss it with probability about 0.8³⁰ ≈ 0.001. Rarer draws can still go unseen.
DETECTION_CALLS = 16


def measure_stochasticity(
    model: Any, x: torch.Tensor, seed: int | None = None, calls: int = 2
) -> dict[str, Any] | None:
    """Run the model twice on `x` (no gradient) and return `stochasticity` of the outputs, or
    None when a call fails. With `seed`, torch's generators are seeded once before the first
    call (not between the calls) in a forked state, so the caller's random state is untouched
    and the spread of a model drawing from torch's generator is reproducible.

    With `calls` > 2, while the outputs so far equal the first, call again (at most `calls` in
    all): the first call that differs gives the spread (a deterministic model costs `calls`
    calls; a sampler the first pair detects, two as before)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        try:
            first = model(x)
            second = model(x)
            if not isinstance(first, torch.Tensor) or not isinstance(second, torch.Tensor):
                return None
            found = stochasticity(first, second)
            for _ in range(calls - 2):
                if found["stochastic"]:
                    break
                later = model(x)
                if not isinstance(later, torch.Tensor):
                    return None
                found = stochasticity(first, later)
        except Exception:  # noqa: BLE001 - uploaded code; the audit's checks report failures
            return None
    return found


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
