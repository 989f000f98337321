"""Forward operators A of the inverse problem: an audit request's `operator`, keyed by `kind`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from schemas.common import MAX_SEED, ArrayRef, TaggedModel


class MRIOperator(TaggedModel):
    kind: Literal["mri"] = "mri"
    mask: Literal["cartesian", "random_lines", "variable_density", "radial"] | ArrayRef = (
        "cartesian"
    )
    acceleration: float = Field(default=4.0, ge=1.0, le=64.0)
    center_fraction: float = Field(default=0.08, ge=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


class RadonOperator(TaggedModel):
    kind: Literal["radon"] = "radon"
    angles: int | list[float] = Field(
        default=60,
        description="A count (equispaced over 180°) or degrees; 1 to 1024 angles either way",
    )

    @model_validator(mode="after")
    def _angles(self) -> RadonOperator:
        n = self.angles if isinstance(self.angles, int) else len(self.angles)
        if not 1 <= n <= 1024:
            raise ValueError("angles: between 1 and 1024 angles")
        return self


class GaussianOperator(TaggedModel):
    """Give exactly one of `m` and `matrix`."""

    kind: Literal["gaussian"] = "gaussian"
    m: int | None = Field(default=None, ge=1, le=65536, description="Number of measurements")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    matrix: ArrayRef | None = Field(
        default=None, description="An explicit [m, n] matrix instead of m"
    )

    @model_validator(mode="after")
    def _m_or_matrix(self) -> GaussianOperator:
        if (self.m is None) == (self.matrix is None):
            raise ValueError("give exactly one of m and matrix")
        return self


class InpaintingOperator(TaggedModel):
    kind: Literal["inpainting"] = "inpainting"
    fraction: float = Field(default=0.5, gt=0.0, le=1.0, description="Fraction of pixels kept")
    mask: ArrayRef | None = None
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


class BlurOperator(TaggedModel):
    kind: Literal["blur"] = "blur"
    kernel: Literal["gaussian", "box"] | ArrayRef = "gaussian"
    sigma: float = Field(default=1.0, gt=0.0, le=32.0)
    size: int = Field(default=9, ge=1, le=65)


class DenoisingOperator(TaggedModel):
    kind: Literal["denoising"] = "denoising"


Operator = Annotated[
    MRIOperator
    | RadonOperator
    | GaussianOperator
    | InpaintingOperator
    | BlurOperator
    | DenoisingOperator,
    Field(discriminator="kind"),
]
