"""Auditing a sampler (a stochastic model; docs/theorem.md, "Auditing a sampler").

- `AveragedModel`: the average map Ψ̄(y) = E Ψ(y), estimated by R calls per call (gradients flow
  through the average: the searches run on it, as expectation-over-transformation attacks do).
- `same_draws`: torch's generator seeded in a forked state, so two evaluations draw the same
  numbers (common random numbers: Ψ̄(y + e) − Ψ̄(y) then loses the noise both share) and a
  replicate is reproducible.
- `replicate_statistics`: a figure re-evaluated on K fresh averages → its mean and standard error.
- `single_draws`: S separate calls per input, for probabilities over the sampler's draws.
- `noise_floor`: the output's spread at fixed inputs, with a confidence interval.
- `probability`: a count over trials with its Clopper–Pearson interval.
- `compare_estimate`: an estimated figure against a bound, judged on its interval's upper end.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from scipy.stats import t as student_t

from schemas.verdicts import compare, fmt
from workers.engine.context import PassCounter, Subject
from workers.engine.stats import clopper_pearson

# The noise floor's draws per input (pairs of independent calls) and how many of the audit's
# inputs it is measured on: 16 pairs per input put its relative standard error near
# 1/√(2·16·n) for n Gaussian output values, and below 10 % for any output of 2+ values.
NOISE_FLOOR_DRAWS = 32
NOISE_FLOOR_INPUTS = 4
CONFIDENCE = 0.95
NOISE_FLOOR_DEFINITION = (
    "√(mean over the inputs y of E‖Ψ(y) − EΨ(y)‖²): the root-mean-square distance of one draw "
    "from the average output at a fixed input (σ√n for Ψ(y) = By + σξ with n output values), "
    "the norm over the whole output; estimated without bias by ‖Ψ₁(y) − Ψ₂(y)‖²/2 over pairs "
    "of independent calls (one input per call), with a Student-t interval on their mean whose "
    "ends are square-rooted"
)


class AveragedModel(torch.nn.Module):
    """Ψ̄_R(y) = (1/R) Σ_r Ψ(y; ω_r): R calls of `model` on the same batch, each drawing anew
    from torch's generator. With `seed`, every call of the average draws the same R samples
    ω_1 … ω_R (torch's generator seeded with it, in a forked state): a fixed, deterministic
    average map, which a search can converge on (a sample-average approximation); without it,
    fresh draws on every call (seed around a call with `same_draws` to reproduce them). A
    deterministic model's average is the model."""

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        draws: int,
        seed: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if draws < 1:
            raise ValueError("draws must be at least 1")
        self.model = model
        self.draws = draws
        self.seed = seed
        self.device = device or torch.device("cpu")

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.seed is None:
            return self._average(y)
        with same_draws(self.seed, self.device):
            return self._average(y)

    def _average(self, y: torch.Tensor) -> torch.Tensor:
        total = self.model(y)
        for _ in range(self.draws - 1):
            total = total + self.model(y)
        return total / self.draws


class DrawCounter(PassCounter):
    """The averaged subject's counter: forward passes are counted by each of the R calls on
    the subject's own counter; a backward pass through the average is R backward passes of the
    model, so a check's `counter.backward += n` adds R·n there."""

    def __init__(self, base: PassCounter, draws: int) -> None:
        # no dataclass __init__: both fields are properties over `base`
        self._base = base
        self._draws = draws

    @property
    def forward(self) -> int:
        return self._base.forward

    @forward.setter
    def forward(self, value: int) -> None:
        self._base.forward = value

    @property
    def backward(self) -> int:
        return self._base.backward

    @backward.setter
    def backward(self, value: int) -> None:
        self._base.backward += (value - self._base.backward) * self._draws


def averaged_subject(
    subject: Subject, draws: int, seed: int | None = None, device: torch.device | None = None
) -> Subject:
    """The subject's average map over `draws` calls (fixed draws with `seed`: AveragedModel),
    counting every call on its counter."""
    return Subject(
        name=subject.name,
        reconstruct=AveragedModel(subject.reconstruct, draws, seed, device),
        counter=DrawCounter(subject.counter, draws),
        stochastic=True,
    )


@contextlib.contextmanager
def same_draws(seed: int, device: torch.device) -> Iterator[None]:
    """torch's generators seeded with `seed` inside, the caller's random state restored after:
    what a model draws from torch's generator inside is a function of the seed."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed % 2**63)
        yield


def replicate_statistics(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values` [K, B]: one figure per replicate (a fresh average) and image → (mean [B],
    standard error of the mean [B]: the sample standard deviation over √K), in float64.
    Non-finite replicates make both non-finite."""
    values = values.double()
    replicates = values.shape[0]
    mean = values.mean(0)
    if replicates < 2:
        return mean, torch.full_like(mean, math.nan)
    spread = values.std(0, unbiased=True)
    return mean, spread / math.sqrt(replicates)


def single_draws(
    reconstruct: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, samples: int
) -> torch.Tensor:
    """[S, B, ...]: `samples` outputs per input, each from a call of its own (batch 1), so a
    model that draws once per call and one that draws per batch element are sampled alike."""
    return torch.stack(
        [
            torch.cat([reconstruct(y[row : row + 1]) for row in range(y.shape[0])])
            for _ in range(samples)
        ]
    )


def noise_floor(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    draws: int = NOISE_FLOOR_DRAWS,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """The output's spread at the fixed inputs `y` (NOISE_FLOOR_DEFINITION), with its interval.

    Each pair of draws gives q = ‖Ψ₁(y) − Ψ₂(y)‖²/2, an unbiased estimate of E‖Ψ(y) − EΨ(y)‖²
    (the trace of the output's covariance); the pairs are independent, so the t interval of
    their mean needs no assumption on the output's distribution beyond a finite variance. The
    interval is for the mean squared spread; its ends are square-rooted (a monotone map)."""
    pairs = max(1, draws // 2)
    with torch.no_grad():
        outputs = single_draws(reconstruct, y, 2 * pairs).double()  # [2P, B, ...]
    first, second = outputs[0::2], outputs[1::2]
    q = (first - second).flatten(2).pow(2).sum(2).div(2).flatten()  # [P·B]
    count = int(q.numel())
    if not bool(torch.isfinite(q).all()):
        return _floor_record(None, None, None, 2 * pairs, y.shape[0], confidence)
    centre = float(q.mean())
    if count < 2:
        return _floor_record(math.sqrt(centre), None, None, 2 * pairs, y.shape[0], confidence)
    half = float(student_t.ppf(0.5 + confidence / 2, count - 1)) * float(q.std()) / count**0.5
    low, high = max(0.0, centre - half), centre + half
    return _floor_record(
        math.sqrt(centre), math.sqrt(low), math.sqrt(high), 2 * pairs, y.shape[0], confidence
    )


def _floor_record(
    value: float | None,
    low: float | None,
    high: float | None,
    draws: int,
    inputs: int,
    confidence: float,
) -> dict[str, Any]:
    return {
        "value": value,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "draws_per_input": draws,
        "inputs": inputs,
        "definition": NOISE_FLOOR_DEFINITION,
    }


def probability(count: int, trials: int) -> dict[str, Any]:
    """`{count, trials, estimate, ci_low, ci_high}`: the share of trials and its exact 95 %
    (Clopper–Pearson) interval; the estimate and interval are null without trials."""
    if trials == 0:
        return {"count": count, "trials": 0, "estimate": None, "ci_low": None, "ci_high": None}
    low, high = clopper_pearson(count, trials)
    return {
        "count": count,
        "trials": trials,
        "estimate": count / trials,
        "ci_low": low,
        "ci_high": high,
    }


def summary_errors(
    values: list[float], errors: list[float], fields: tuple[str, ...]
) -> dict[str, float | None]:
    """Standard errors of a summary over images, field by field: `mean` → √(Σ seᵢ²)/N (the
    images' averages are independent); `max`/`min` → the standard error of the image attaining
    it; `std` has none here (null)."""
    out: dict[str, float | None] = {}
    pairs = [(v, e) for v, e in zip(values, errors, strict=True) if math.isfinite(v)]
    for field in fields:
        if not pairs:
            out[field] = None
        elif field == "mean":
            out[field] = math.sqrt(math.fsum(e * e for _, e in pairs)) / len(pairs)
        elif field in ("max", "min"):
            pick = max if field == "max" else min
            out[field] = pick(pairs, key=lambda pair: pair[0])[1]
        else:
            out[field] = None
    return out


def interval_factor(replicates: int, confidence: float = CONFIDENCE) -> float:
    """t such that estimate ± t·SE is the `confidence` interval of a mean over `replicates`
    replicates: Student's t quantile with K − 1 degrees of freedom (2.365 for K = 8, 95 %).
    Conservative for a mean over images, whose standard error pools more degrees of freedom."""
    return float(student_t.ppf(0.5 + confidence / 2, max(1, replicates - 1)))


def compare_estimate(
    quantity: str,
    estimate: float | None,
    standard_error: float | None,
    replicates: int,
    bound: float,
) -> tuple[dict[str, Any], str | None]:
    """A sampler's estimated figure (a mean over `replicates` fresh averages) against an
    `at_most` bound, judged on the upper end of its 95 % interval, estimate + t·SE
    (`interval_factor`; docs/theorem.md, "Verdicts on estimated figures"): the check passes
    only when the bound lies above the whole interval. The comparison also carries the
    `estimate` and its `standard_error`. The warning (None when the verdict is decided by the
    interval) says when the bound lies inside the interval: the verdict is then `fail` whether
    or not the estimate is below the bound, and more replicates or draws would narrow it."""
    finite = (
        estimate is not None
        and standard_error is not None
        and math.isfinite(estimate)
        and math.isfinite(standard_error)
    )
    factor = interval_factor(replicates)
    upper = estimate + factor * standard_error if finite else None  # type: ignore[operator]
    comparison = compare(f"{quantity} (upper 95 % bound)", upper, bound)
    comparison["estimate"] = estimate if estimate is None or math.isfinite(estimate) else None
    comparison["standard_error"] = (
        standard_error if standard_error is None or math.isfinite(standard_error) else None
    )
    warning = None
    if upper is not None:
        low = estimate - factor * standard_error  # type: ignore[operator]
        if low <= bound < upper:
            side = "below" if estimate <= bound else "above"  # type: ignore[operator]
            warning = (
                f"{quantity}: the bound {fmt(bound)} lies inside the 95 % interval "
                f"[{fmt(low)}, {fmt(upper)}] of the sampler's estimate {fmt(estimate)} "
                f"(standard error {fmt(standard_error)} over {replicates} replicates; the "
                f"estimate is {side} the bound): the verdict reads the interval's upper end "
                "and fails; more replicates (sampler.replicates) or draws (sampler.draws) "
                "narrow the interval"
            )
    return comparison, warning
