"""Statistics of the checks' samples: exact binomial intervals and summaries."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from scipy.stats import beta


def clopper_pearson(failures: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion."""
    if trials <= 0 or not 0 <= failures <= trials:
        raise ValueError("need 0 <= failures <= trials and trials > 0")
    alpha = 1.0 - confidence
    low = 0.0 if failures == 0 else float(beta.ppf(alpha / 2, failures, trials - failures + 1))
    high = (
        1.0
        if failures == trials
        else float(beta.ppf(1 - alpha / 2, failures + 1, trials - failures))
    )
    return low, high


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def std(values: Sequence[float]) -> float:
    """Population standard deviation (all samples drawn are the population reported)."""
    centre = mean(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / len(values))


def summary(values: Sequence[float], fields: Sequence[str]) -> dict[str, float]:
    """The named statistics (mean, std, min, max) of a non-empty sequence."""
    compute: dict[str, Callable[[Sequence[float]], float]] = {
        "mean": mean,
        "std": std,
        "min": min,
        "max": max,
    }
    return {name: float(compute[name](values)) for name in fields}
