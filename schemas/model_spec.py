"""What an uploaded model is: `spec` of `POST /v1/models`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from schemas.common import StrictModel
from schemas.operators import Operator

ModelFormat = Literal["torchscript", "export", "safetensors", "onnx"]
ModelStatus = Literal["validating", "ready", "rejected"]

# A measurement is probed on 2 of them: bounded so a spec cannot ask the probe for gigabytes.
MAX_MEASUREMENT_SIDE = 1 << 20
MAX_MEASUREMENT_VALUES = 1 << 22


def _product(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


# Architectures the engine can build from `.safetensors` weights without running uploaded code.
REGISTERED_ARCHITECTURES = ("unet", "dncnn", "small_cnn")

MAX_IMAGE_SIDE = 1024


class Architecture(StrictModel):
    name: Literal["unet", "dncnn", "small_cnn"] = Field(
        description="A registered architecture (deepinv models; small_cnn: a classifier)"
    )
    params: dict[str, int | float | bool | str] = Field(
        default_factory=dict, description="Keyword arguments of the architecture's constructor"
    )


class ModelSpec(StrictModel):
    """Besides each field's own limits: a `complex` model has 2 channels; `value_range` is
    (lower, upper) with lower < upper; a `classification` model needs `num_classes` and input
    `image`."""

    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    task: Literal["reconstruction", "classification"]
    input: Literal["measurement", "adjoint", "image"] = Field(
        description="What the network takes: measurements y, the adjoint A*y, or an image"
    )
    image_shape: tuple[
        Annotated[int, Field(ge=1, le=16)],
        Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)],
        Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)],
    ] = Field(
        description="[C, H, W] of one image (the network's output for reconstruction): "
        f"1 to 16 channels (2 when complex), sides 1 to {MAX_IMAGE_SIDE}"
    )
    complex: bool = Field(
        default=False, description="Complex images stored as 2 channels (real, imaginary)"
    )
    value_range: tuple[float, float] = Field(
        default=(0.0, 1.0), description="(lower, upper) of the model's values; lower < upper"
    )
    num_classes: int | None = Field(
        default=None, ge=2, le=100_000, description="Required for task `classification`"
    )
    architecture: Architecture | None = None
    operator: Operator | None = Field(
        default=None,
        description="The forward operator the model was trained for (input `measurement` or "
        "`adjoint`): admission probes the model through it. Without it (and without "
        "`measurement_shape`) a measurement model is probed by its first audit",
    )
    measurement_shape: list[Annotated[int, Field(ge=1, le=MAX_MEASUREMENT_SIDE)]] | None = Field(
        default=None,
        min_length=1,
        max_length=4,
        description="Shape of one measurement y (input `measurement`), when no `operator` is "
        "named: admission probes the model on inputs of this shape",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        c, h, w = self.image_shape
        if not (1 <= c <= 16):
            raise ValueError("image_shape: channels must be between 1 and 16")
        if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
            raise ValueError(
                f"image_shape: height and width must be between 1 and {MAX_IMAGE_SIDE}"
            )
        if self.complex and c != 2:
            raise ValueError(
                "complex models carry (real, imaginary) as 2 channels: image_shape[0] must be 2"
            )
        lo, hi = self.value_range
        if not lo < hi:
            raise ValueError("value_range: the lower bound must be below the upper bound")
        if self.operator is not None and self.input == "image":
            raise ValueError("operator: only a model with input 'measurement' or 'adjoint' has one")
        if self.measurement_shape is not None:
            if self.input != "measurement":
                raise ValueError("measurement_shape: only a model with input 'measurement' has one")
            if self.operator is not None:
                raise ValueError("name either operator or measurement_shape, not both")
            if _product(self.measurement_shape) > MAX_MEASUREMENT_VALUES:
                raise ValueError(
                    f"measurement_shape: at most {MAX_MEASUREMENT_VALUES} values per measurement"
                )
        if self.task == "classification":
            if self.num_classes is None:
                raise ValueError("num_classes is required for task 'classification'")
            if self.input != "image":
                raise ValueError("a classifier takes input 'image'")
        return self
