"""How a check audits a stochastic model (a sampler): the `sampler` field of worst_case,
lipschitz, false_negative and false_positive (docs/theorem.md, "Auditing a sampler").

Every field has a default, and the check's `sampler` itself defaults to null (the defaults
below): a deterministic model ignores it, and a config that leaves it out dumps as it did before
the field existed (schemas.audits.strip_unset_regressions)."""

from __future__ import annotations

from pydantic import Field

from schemas.common import StrictModel

DEFAULT_DRAWS = 8
DEFAULT_REPLICATES = 8
DEFAULT_SAMPLES = 32
DEFAULT_HALLUCINATION_CONTRAST = 0.1


class AveragingSettings(StrictModel):
    """The average map Ψ̄(y) = E Ψ(y): searched on R draws per call (an expectation over the
    sampler, as expectation-over-transformation attacks do), each found figure re-evaluated on
    K fresh R-draw averages, whose spread gives its standard error."""

    draws: int = Field(
        default=DEFAULT_DRAWS,
        ge=1,
        le=1024,
        description="R: calls of the model averaged into one call of the average map",
    )
    replicates: int = Field(
        default=DEFAULT_REPLICATES,
        ge=2,
        le=256,
        description="K: fresh R-draw averages each found figure is re-evaluated on; the "
        "figure is their mean and its standard error their standard deviation over √K",
    )


class DrawSettings(AveragingSettings):
    """As AveragingSettings, plus single draws for probabilities over the sampler."""

    samples: int = Field(
        default=DEFAULT_SAMPLES,
        ge=1,
        le=100_000,
        description="S: single draws of the model per trial point (a placement, an image); "
        "each is a separate call, so models that draw once per call are sampled too",
    )


class HallucinationSettings(DrawSettings):
    """As DrawSettings, plus what counts as a hallucinated structure."""

    contrast: float = Field(
        default=DEFAULT_HALLUCINATION_CONTRAST,
        gt=0.0,
        le=10.0,
        description="A draw hallucinates when max |Ψ(y) − x| inside the window (where the "
        "image has no structure) exceeds this, relative to the value range",
    )


class SamplerThreshold(StrictModel):
    """Bounds on a stochastic model's own figures, the report's `model` section (the audit
    config's `sampler_threshold`): judged only when the model is stochastic and audited for
    reconstruction; a deterministic model has no noise floor, and the report says the bound was
    not compared (docs/reports.md, "Stochastic models")."""

    max_noise_floor: float = Field(
        gt=0.0,
        description="Bound on the upper end of the 95 % interval of `model.noise_floor`: the "
        "root-mean-square distance of one draw from the average output at a fixed input, "
        "absolute (in the output's units, the norm over the whole output), as reported",
    )
