"""The torch device an audit (or a model's load) runs on, from the `device` a request names."""

from __future__ import annotations

import torch

from workers.shared.errors import EngineInputError


def resolve_device(requested: str | torch.device) -> torch.device:
    """`auto` is the GPU when this host has one, else the CPU. Naming a GPU this host does not
    have is the request's error (EngineInputError), never a silent fall back to the CPU."""
    if str(requested) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise EngineInputError(f"device {str(requested)!r} is not a torch device: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineInputError(
                f"device {str(requested)!r} was requested but this host has no GPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EngineInputError(
                f"device {str(requested)!r} was requested but this host has "
                f"{torch.cuda.device_count()} GPU(s)"
            )
    return device
