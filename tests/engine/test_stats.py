from __future__ import annotations

import pytest

from workers.engine.stats import clopper_pearson, summary


def test_clopper_pearson_zero_failures_matches_exact_bound() -> None:
    # 0/20: the upper end solves (1 − p)^20 = 0.025, p = 1 − 0.025^(1/20)
    low, high = clopper_pearson(0, 20)
    assert low == 0.0
    assert high == pytest.approx(1 - 0.025 ** (1 / 20), abs=1e-12)
    assert high == pytest.approx(0.1684, abs=1e-4)


def test_clopper_pearson_all_failures_is_the_mirror_image() -> None:
    low, high = clopper_pearson(20, 20)
    assert (low, high) == (pytest.approx(0.025 ** (1 / 20)), 1.0)


def test_clopper_pearson_interior_value() -> None:
    # R: binom.test(5, 20)$conf.int -> 0.08657147 0.49104587
    low, high = clopper_pearson(5, 20)
    assert low == pytest.approx(0.08657147, abs=1e-8)
    assert high == pytest.approx(0.49104587, abs=1e-8)


def test_clopper_pearson_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)


def test_summary() -> None:
    assert summary([1.0, 2.0, 3.0, 6.0], ("mean", "std", "min", "max")) == {
        "mean": 3.0,
        "std": pytest.approx(1.8708287, abs=1e-7),
        "min": 1.0,
        "max": 6.0,
    }
