"""Loading uploaded models and admitting them (screen, load, probe).

`load_model` is what an audit uses; `admit` is what the sandboxed runner calls for a new upload
(through `workers.engine.entry_points.admit_model`). Both screen the file first
(workers.engine.screening): TorchScript and `.pt2` archives are code, and are only ever loaded
inside the sandbox. An endpoint model (format `endpoint`) has no file to screen: `load_model`
gives the module that queries its endpoint through the process's query client
(workers.engine.endpoint_model).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.model_spec import ModelFormat, ModelSpec
from schemas.runner import JobModelFormat
from workers.engine.admission_result import Admission
from workers.engine.architectures import build_architecture
from workers.engine.devices import resolve_device
from workers.engine.probe import parameter_count, probe_model
from workers.engine.rejection import ModelRejected
from workers.engine.screening import (
    GraphSummary,
    screen_archive,
    screen_exported_program,
    screen_torchscript_module,
)

__all__ = ["ModelRejected", "admit", "load_model", "resolve_device"]

MAX_KEYS_LISTED = 8


@dataclass
class LoadedModel:
    module: torch.nn.Module
    graph: GraphSummary | None  # None for safetensors: the engine built the graph itself


def load_model(
    path: Path, fmt: JobModelFormat, spec: ModelSpec, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Screen and load a model: eval mode, parameters frozen (the audit differentiates with
    respect to inputs only). Raises ModelRejected with a reason a person can act on.

    Format `endpoint`: the endpoint model of the installed query client
    (workers.engine.endpoint_model.endpoint_module); `path` holds the endpoint's identity and is
    not read. Raises EngineInputError when no client is installed."""
    if fmt == "endpoint":
        from workers.engine.endpoint_model import endpoint_module

        return endpoint_module(spec)
    return _load_screened(Path(path), fmt, spec, resolve_device(device)).module


def _load_screened(
    path: Path, fmt: ModelFormat, spec: ModelSpec, device: torch.device
) -> LoadedModel:
    screen_archive(path, fmt)
    if fmt == "torchscript":
        loaded = _load_torchscript(path, device)
    elif fmt == "export":
        loaded = _load_export(path, device)
    elif fmt == "onnx":
        from workers.engine.onnx_models import load_onnx  # onnx, onnx2torch: only when needed

        loaded = LoadedModel(*load_onnx(path, spec, device))
    else:
        loaded = LoadedModel(_load_safetensors(path, spec, device), None)
    for parameter in loaded.module.parameters():
        parameter.requires_grad_(False)
    return loaded


def _load_torchscript(path: Path, device: torch.device) -> LoadedModel:
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001 - a broken archive of any kind is a rejection
        raise ModelRejected(f"the TorchScript archive cannot be loaded: {_message(exc)}") from exc
    summary = screen_torchscript_module(module)
    module.eval()
    return LoadedModel(module, summary)


def _load_export(path: Path, device: torch.device) -> LoadedModel:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelRejected(f"the .pt2 archive cannot be loaded: {_message(exc)}") from exc
    summary = screen_exported_program(program)
    try:
        module = program.module().to(device)
    except Exception as exc:  # noqa: BLE001
        raise ModelRejected(f"the exported program cannot be run: {_message(exc)}") from exc
    # An exported program is already frozen in inference form: `.eval()` is refused or a no-op.
    with contextlib.suppress(NotImplementedError):
        module.eval()
    return LoadedModel(module, summary)


def _load_safetensors(path: Path, spec: ModelSpec, device: torch.device) -> torch.nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelRejected(f"the safetensors file cannot be read: {_message(exc)}") from exc
    module = build_architecture(spec.architecture, spec)
    _check_state_dict_fits(module, weights, spec)
    module.load_state_dict(weights, strict=True)
    return module.to(device).eval()


def _check_state_dict_fits(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], spec: ModelSpec
) -> None:
    """Name what does not fit, instead of load_state_dict's long message."""
    expected = module.state_dict()
    name = spec.architecture.name if spec.architecture else "?"
    problems = []
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    mismatched = [
        f"{key}: file {list(weights[key].shape)} vs model {list(expected[key].shape)}"
        for key in sorted(set(expected) & set(weights))
        if weights[key].shape != expected[key].shape
    ]
    if mismatched:
        problems.append(f"shape mismatch {_listed(mismatched)}")
    if problems:
        raise ModelRejected(
            f"the weights do not fit architecture {name!r} with the spec's params: "
            + "; ".join(problems)
        )


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_KEYS_LISTED])
    more = len(items) - MAX_KEYS_LISTED
    return f"[{shown}{f', and {more} more' if more > 0 else ''}]"


def _message(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(exc).__name__


def admit(
    path: Path, fmt: ModelFormat, spec: ModelSpec, device: str | torch.device = "cpu"
) -> Admission:
    """Screen, load and probe a model. Never raises for a bad model: the reason is returned."""
    info: dict[str, object] = {"format": fmt}
    started = time.perf_counter()
    try:
        dev = resolve_device(device)
        info["device"] = str(dev)
        loaded = _load_screened(Path(path), fmt, spec, dev)
        info["parameter_count"] = parameter_count(loaded.module)
        if loaded.graph is not None:
            info["graph_op_count"] = loaded.graph.forward_op_count
            info["graphs_screened"] = loaded.graph.methods_screened
        info["load_seconds"] = round(time.perf_counter() - started, 6)
        if fmt == "onnx":  # the conversion must compute what onnxruntime computes
            from workers.engine.onnx_models import verify_conversion

            info.update(verify_conversion(Path(path), loaded.module, spec, dev))
        info.update(probe_model(loaded.module, spec, dev))
    except ModelRejected as exc:
        return Admission(ok=False, reason=exc.reason, info=info)
    except Exception as exc:  # noqa: BLE001 - an uploaded model must never crash admission
        reason = f"the model could not be admitted: {type(exc).__name__}: {_message(exc)}"
        return Admission(ok=False, reason=reason, info=info)
    return Admission(ok=True, reason=None, info=info)
