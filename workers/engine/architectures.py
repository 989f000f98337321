"""Architectures the engine builds itself, so that `.safetensors` weights run no uploaded code.

Each entry names a deepinv model and the constructor arguments a user may set. Anything that
could make the constructor read a file or the network (deepinv's `pretrained`) or pick a device
is not settable: weights come only from the uploaded `.safetensors` file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import deepinv
import torch

from schemas.model_spec import Architecture, ModelSpec
from workers.engine.rejection import ModelRejected
from workers.engine.small_cnn import SmallCNN

ParamValue = int | float | bool | str


@dataclass(frozen=True)
class RegisteredArchitecture:
    name: str
    build: Callable[..., torch.nn.Module]
    allowed_params: frozenset[str]
    # extra constructor arguments the engine always passes (never downloads, never reads files)
    fixed_params: Mapping[str, Any]


def _build_unet(*, base_channels: int | None = None, **params: Any) -> torch.nn.Module:
    # `channels_per_scale` is a list, which the spec's scalar params cannot carry; the common
    # "double the width at every scale" layout is offered as `base_channels` instead.
    if base_channels is not None:
        scales = int(params.get("scales", 4))
        params["channels_per_scale"] = [int(base_channels) * 2**k for k in range(scales)]
    return deepinv.models.UNet(**params)


def _build_dncnn(**params: Any) -> torch.nn.Module:
    return deepinv.models.DnCNN(**params)


def _build_small_cnn(**params: Any) -> torch.nn.Module:
    return SmallCNN(**params)


ARCHITECTURES: dict[str, RegisteredArchitecture] = {
    "unet": RegisteredArchitecture(
        name="unet",
        build=_build_unet,
        allowed_params=frozenset(
            {
                "in_channels",
                "out_channels",
                "residual",
                "circular_padding",
                "cat",
                "bias",
                "batch_norm",
                "scales",
                "base_channels",
            }
        ),
        fixed_params={"device": "cpu", "dim": 2},
    ),
    "dncnn": RegisteredArchitecture(
        name="dncnn",
        build=_build_dncnn,
        allowed_params=frozenset({"in_channels", "out_channels", "depth", "bias", "nf"}),
        fixed_params={"pretrained": None, "device": "cpu", "dim": 2},
    ),
    "small_cnn": RegisteredArchitecture(
        name="small_cnn",
        build=_build_small_cnn,
        allowed_params=frozenset({"in_channels", "width"}),
        fixed_params={},
    ),
}


def constructor_arguments(architecture: Architecture | None, spec: ModelSpec) -> dict[str, Any]:
    """The keyword arguments the architecture is built with: the spec's params, with the
    channel counts defaulting to the spec's image channels, plus the fixed safe ones."""
    if architecture is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelRejected(
            f"a .safetensors model needs spec.architecture (one of: {known}) to be built"
        )
    name = architecture.name
    arch = ARCHITECTURES.get(name)
    if arch is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelRejected(f"architecture {name!r} is not registered (registered: {known})")
    given: dict[str, ParamValue] = dict(architecture.params)
    unknown = sorted(set(given) - arch.allowed_params)
    if unknown:
        allowed = ", ".join(sorted(arch.allowed_params))
        raise ModelRejected(
            f"architecture {name!r} does not accept parameter(s) {', '.join(unknown)} "
            f"(accepted: {allowed})"
        )
    channels = spec.image_shape[0]
    kwargs: dict[str, Any] = {"in_channels": channels, "out_channels": channels}
    if spec.task == "classification":  # a classifier's output is num_classes logits
        kwargs = {"in_channels": channels, "num_classes": spec.num_classes}
    kwargs.update(given)
    kwargs.update(arch.fixed_params)
    return kwargs


def build_architecture(architecture: Architecture | None, spec: ModelSpec) -> torch.nn.Module:
    """Build the registered architecture (random weights) with the spec's parameters."""
    kwargs = constructor_arguments(architecture, spec)
    assert architecture is not None  # constructor_arguments rejected None
    try:
        return ARCHITECTURES[architecture.name].build(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelRejected(
            f"architecture {architecture.name!r} cannot be built with {given_text(kwargs)}: {exc}"
        ) from exc


def given_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
