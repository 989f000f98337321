"""Every check owns its verdict: its `merge` writes the threshold's comparisons (quantity,
measured, bound, direction, passed) and the verdict follows from them alone. Hand-made shard
results with known numbers: a bound just above the measured value passes, just below fails, and
a missing measurement fails."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from schemas.audits import AuditConfig
from schemas.reports import ThresholdComparison
from schemas.verdicts import audit_verdict, check_verdict, compare
from workers.engine.checks.random_noise import METRICS as NOISE_METRICS
from workers.engine.checks.random_noise import _level_sums
from workers.engine.checks.worst_case import RAW
from workers.engine.registry import CHECKS, get_check

EPS = 1e-9


def _merge(kind: str, check: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    config = AuditConfig.model_validate(
        {
            "dataset": {"builtin": "ellipses", "count": 2, "size": 16},
            "operator": {"kind": "mri", "mask": "cartesian"},
            "checks": [{"kind": kind, **check}],
        }
    ).checks[0]
    result = get_check(kind).merge(config, shards)
    for comparison in result["comparisons"]:
        ThresholdComparison.model_validate(comparison)  # the report schema's shape
    assert result["verdict"] == check_verdict(result["comparisons"])
    return result


def _only(result: dict[str, Any]) -> dict[str, Any]:
    (comparison,) = result["comparisons"]
    return comparison


# --- the verdict rule ------------------------------------------------------------------------


def test_compare_at_most_at_least_and_missing() -> None:
    assert compare("q", 1.0, 1.0)["passed"] and not compare("q", 1.0 + EPS, 1.0)["passed"]
    assert compare("q", 1.0, 1.0, "at_least")["passed"]
    assert not compare("q", 1.0 - EPS, 1.0, "at_least")["passed"]
    for missing in (None, math.nan, math.inf):
        comparison = compare("q", missing, 1.0)
        assert comparison["passed"] is False and comparison["measured"] is None
    assert compare("q", None, 1.0, "at_least", passed=True)["passed"] is True


def test_the_verdict_follows_the_comparisons() -> None:
    passed, failed = compare("a", 0.1, 1.0), compare("b", 2.0, 1.0)
    assert check_verdict([]) == "info"
    assert check_verdict([passed]) == "pass"
    assert check_verdict([passed, failed]) == "fail"
    assert audit_verdict(["info", "pass"]) == "pass"
    assert audit_verdict(["pass", "fail", "info"]) == "fail"
    assert audit_verdict(["info"]) == audit_verdict([]) == "info"


def test_the_table_has_every_check_kind_of_the_schemas() -> None:
    from typing import get_args

    from schemas.checks import Check

    kinds = {
        member.model_fields["kind"].default
        for member in get_args(get_args(Check)[0])
        if hasattr(member, "model_fields")
    }
    assert set(CHECKS) == kinds
    for kind in kinds:  # every row names a module and class that run that kind
        assert get_check(kind).kind == kind
    with pytest.raises(KeyError, match="unknown check kind"):
        get_check("nope")


def test_an_audit_imports_only_the_checks_it_names() -> None:
    """The classifier attacks' libraries stay out of a reconstruction audit's sandboxed steps."""
    code = (
        "import sys\n"
        "from workers.engine.registry import get_check\n"
        "import workers.engine.audit\n"
        "get_check('random_noise')\n"
        "print(sorted(m for m in ('adv_lib', 'autoattack') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out


# --- per check ------------------------------------------------------------------------------


def _worst_case_shard(levels: dict[float, float], non_finite: bool = False) -> dict[str, Any]:
    def row(level: float, error: float) -> dict[str, Any]:
        values = {name: 0.5 for name in RAW}
        values.update(relative_error=error, lipschitz_lower_bound=10 * error)
        if non_finite:
            values["relative_error"] = math.nan
        return {"level": level, "steps": 3, "optimizer": "pgd", **values}

    image = {
        "index": 0,
        "clean_relative_error": 0.01,
        "levels": [row(level, error) for level, error in levels.items()],
    }
    return {"images": [image], "worst": [], "warnings": []}


@pytest.mark.parametrize(("bound", "passed"), [(0.3 + EPS, True), (0.3 - EPS, False)])
def test_worst_case_relative_error(bound: float, passed: bool) -> None:
    check = {"levels": [0.01, 0.05], "threshold": {"max_relative_error": bound, "at_level": 0.05}}
    result = _merge("worst_case", check, [_worst_case_shard({0.01: 0.1, 0.05: 0.3})])
    comparison = _only(result)
    assert comparison["quantity"] == "worst-case relative error at level 0.05"
    assert comparison["measured"] == 0.3 and comparison["direction"] == "at_most"
    assert comparison["passed"] is passed
    assert result["verdict"] == ("pass" if passed else "fail")


@pytest.mark.parametrize(("bound", "passed"), [(3.0 + EPS, True), (3.0 - EPS, False)])
def test_worst_case_lipschitz_is_the_largest_over_levels(bound: float, passed: bool) -> None:
    check = {"levels": [0.01, 0.05], "threshold": {"max_lipschitz": bound}}
    result = _merge("worst_case", check, [_worst_case_shard({0.01: 0.1, 0.05: 0.3})])
    comparison = _only(result)
    assert comparison["measured"] == pytest.approx(3.0) and comparison["passed"] is passed


def test_worst_case_missing_level_fails() -> None:
    """A level no image reached (a stopped search) has no measurement: it cannot pass."""
    check = {"levels": [0.01, 0.05], "threshold": {"max_relative_error": 0.9, "at_level": 0.01}}
    result = _merge("worst_case", check, [_worst_case_shard({0.05: 0.3})])
    comparison = _only(result)
    assert comparison["measured"] is None and comparison["passed"] is False
    assert result["verdict"] == "fail"


def test_worst_case_non_finite_outputs_fail() -> None:
    check = {"levels": [0.05], "threshold": {"max_relative_error": 0.9}}
    result = _merge("worst_case", check, [_worst_case_shard({0.05: 0.3}, non_finite=True)])
    quantities = {c["quantity"]: c for c in result["comparisons"]}
    nan = quantities["outputs that were NaN or infinite"]
    assert nan["measured"] == 1 and nan["bound"] == 0 and not nan["passed"]
    assert result["verdict"] == "fail"


def test_no_threshold_means_no_comparisons_and_info() -> None:
    result = _merge("worst_case", {"levels": [0.05]}, [_worst_case_shard({0.05: 0.3})])
    assert result["comparisons"] == [] and result["verdict"] == "info"


def _noise_shard(failures: int, trials: int, level: float) -> dict[str, Any]:
    values = {name: [0.1] * trials for name in NOISE_METRICS}
    values["relative_error"] = [0.9] * failures + [0.1] * (trials - failures)
    sums = _level_sums(level, values, 0.5)
    return {"images": [{"index": 0, "clean_relative_error": 0.05, "levels": [sums]}]}


@pytest.mark.parametrize("above", [True, False])
def test_random_noise_upper_bound_of_the_failure_probability(above: bool) -> None:
    shard = _noise_shard(2, 10, 0.05)
    probe = _merge("random_noise", {"levels": [0.05], "samples": 10}, [shard])
    high = probe["levels"][0]["failure_probability"]["ci_high"]
    bound = high + EPS if above else high - EPS
    check = {
        "levels": [0.05],
        "samples": 10,
        "failure_error": 0.5,
        "threshold": {"max_failure_probability": bound},
    }
    result = _merge("random_noise", check, [shard])
    comparison = _only(result)
    assert comparison["quantity"] == "failure probability (upper 95 % bound) at level 0.05"
    assert comparison["measured"] == high and comparison["passed"] is above
    assert result["verdict_level"] == 0.05


@pytest.mark.parametrize(("bound", "passed"), [(2.0 + EPS, True), (2.0 - EPS, False)])
def test_lipschitz_largest_norm(bound: float, passed: bool) -> None:
    shard = {
        "per_image": [
            {"index": i, "jacobian_norm": n, "iterations": 1} for i, n in [(0, 1.0), (1, 2.0)]
        ]
    }
    result = _merge(
        "lipschitz", {"iterations": 5, "threshold": {"max_jacobian_norm": bound}}, [shard]
    )
    comparison = _only(result)
    assert comparison["measured"] == 2.0 and comparison["passed"] is passed


def test_lipschitz_non_finite_norm_fails_even_below_the_bound() -> None:
    per_image = [
        {"index": 0, "jacobian_norm": 1.0, "iterations": 1},
        {"index": 1, "jacobian_norm": None, "iterations": 1},
    ]
    check = {"iterations": 5, "threshold": {"max_jacobian_norm": 5.0}}
    result = _merge("lipschitz", check, [{"per_image": per_image}])
    largest, non_finite = result["comparisons"]
    assert largest["passed"] and largest["measured"] == 1.0
    assert non_finite["measured"] == 1 and not non_finite["passed"]
    assert result["verdict"] == "fail"


@pytest.mark.parametrize(("bound", "passed"), [(0.5 - EPS, True), (0.5 + EPS, False)])
def test_adversarial_robust_accuracy_is_a_lower_bound(bound: float, passed: bool) -> None:
    images = [
        {"index": 0, "clean_correct": True, "broken_at": None, "broken_by": None},
        {"index": 1, "clean_correct": True, "broken_at": 0.01, "broken_by": "pgd"},
    ]
    check = {
        "epsilons": [0.01, 0.1],
        "threshold": {"min_robust_accuracy": bound, "at_epsilon": 0.01},
    }
    result = _merge("adversarial", check, [{"images": images}])
    comparison = _only(result)
    assert comparison["quantity"] == "robust accuracy at ε = 0.01"
    assert comparison["measured"] == 0.5 and comparison["direction"] == "at_least"
    assert comparison["passed"] is passed


@pytest.mark.parametrize(("bound", "passed"), [(0.2 - EPS, True), (0.2 + EPS, False)])
def test_minimal_perturbation_median(bound: float, passed: bool) -> None:
    images = [{"index": i, "norm": n, "found_by": "fmn"} for i, n in enumerate([0.1, 0.2, 0.3])]
    check = {"steps": 10, "threshold": {"min_median_norm": bound}}
    comparison = _only(_merge("minimal_perturbation", check, [{"images": images}]))
    assert comparison["measured"] == pytest.approx(0.2) and comparison["passed"] is passed


@pytest.mark.parametrize("unmeasured", ["fail", "pass"])
def test_minimal_perturbation_unmeasured_median_follows_the_threshold(unmeasured: str) -> None:
    images = [{"index": i, "norm": n, "found_by": "fmn"} for i, n in enumerate([0.1, None, None])]
    check = {"steps": 10, "threshold": {"min_median_norm": 0.5, "unmeasured_median": unmeasured}}
    result = _merge("minimal_perturbation", check, [{"images": images}])
    comparison = _only(result)
    assert comparison["measured"] is None and comparison["passed"] is (unmeasured == "pass")
    assert result["verdict"] == unmeasured


@pytest.mark.parametrize("above", [True, False])
def test_universal_fooling_rate(above: bool) -> None:
    shard = {
        "fooled": 2,
        "trials": 10,
        "train_images": [0],
        "held_out_images": list(range(1, 11)),
        "perturbation": np.zeros((1, 4, 4)).tolist(),
    }
    probe = _merge("universal", {"steps": 1}, [dict(shard)])
    high = probe["fooling_rate"]["ci_high"]
    check = {"steps": 1, "threshold": {"max_fooling_rate": high + EPS if above else high - EPS}}
    comparison = _only(_merge("universal", check, [dict(shard)]))
    assert comparison["measured"] == high and comparison["passed"] is above


def _fp_shard(contrasts: list[float]) -> dict[str, Any]:
    return {
        "rows": [{"index": i, "spurious_contrast": c} for i, c in enumerate(contrasts)],
        "panels": [],
    }


@pytest.mark.parametrize(("bound", "passed"), [(0.4 + EPS, True), (0.4 - EPS, False)])
def test_false_positive_largest_contrast(bound: float, passed: bool) -> None:
    check = {"threshold": {"max_spurious_contrast": bound}}
    comparison = _only(_merge("false_positive", check, [_fp_shard([0.1, 0.4])]))
    assert comparison["measured"] == 0.4 and comparison["passed"] is passed


def test_false_positive_nan_fails_even_below_the_bound() -> None:
    check = {"threshold": {"max_spurious_contrast": 0.9}}
    result = _merge("false_positive", check, [_fp_shard([0.1, math.nan])])
    largest, nan = result["comparisons"]
    assert largest["passed"] and nan["measured"] == 1 and not nan["passed"]
    assert result["verdict"] == "fail"


def _fn_shard(misses: int, trials: int) -> dict[str, Any]:
    row = {
        "index": 0,
        "misses": misses,
        "trials": trials,
        "recoverable": trials > 0,
        "nonfinite": 0,
        "recovery_min": 0.5 if trials else None,
        "recovery_sum": 0.5 * trials,
        "recovery_count": trials,
    }
    return {"rows": [row], "panels": [], "warnings": [], "reference_method": "exact"}


@pytest.mark.parametrize(("bound", "passed"), [(0.25 + EPS, True), (0.25 - EPS, False)])
def test_false_negative_search_miss_rate(bound: float, passed: bool) -> None:
    check = {"search": "adversarial", "threshold": {"max_miss_rate": bound}}
    comparison = _only(_merge("false_negative", check, [_fn_shard(1, 4)]))
    assert comparison["quantity"] == "miss rate"
    assert comparison["measured"] == 0.25 and comparison["passed"] is passed


def test_false_negative_noise_uses_the_upper_bound() -> None:
    check = {"search": "noise", "threshold": {"max_miss_rate": 0.3}}
    result = _merge("false_negative", check, [_fn_shard(1, 4)])
    comparison = _only(result)
    assert comparison["quantity"] == "miss rate (upper 95 % bound)"
    assert comparison["measured"] == result["miss_rate"]["ci_high"] > 0.3
    assert result["verdict"] == "fail"


def test_false_negative_without_trials_judges_nothing() -> None:
    """No recoverable placement: the operator cannot carry the lesion, so there is nothing to
    compare (verdict info, with a warning), not a failed measurement of the network."""
    check = {"threshold": {"max_miss_rate": 0.5}}
    result = _merge("false_negative", check, [_fn_shard(0, 0)])
    assert result["comparisons"] == [] and result["verdict"] == "info"
    assert any("no placement is recoverable" in w for w in result["warnings"])


def _kernel_shard(best: float | None) -> dict[str, Any]:
    certificates = [] if best is None else [{"best_lower_bound": best, "bound": best / 2}]
    return {
        "certificates": certificates,
        "hallucination": {"rows": [], "method": "exact"},
        "warnings": [],
        "files": {},
    }


@pytest.mark.parametrize(("bound", "passed"), [(7.0 + EPS, True), (7.0 - EPS, False)])
def test_kernel_proven_bound(bound: float, passed: bool) -> None:
    check = {"threshold": {"max_certified_lipschitz": bound}}
    comparison = _only(_merge("kernel", check, [_kernel_shard(7.0)]))
    assert comparison["measured"] == 7.0 and comparison["passed"] is passed


def test_kernel_without_certificate_proves_only_zero() -> None:
    check = {"threshold": {"max_certified_lipschitz": 1.0}}
    result = _merge("kernel", check, [_kernel_shard(None)])
    comparison = _only(result)
    assert comparison["measured"] == 0.0 and comparison["passed"]
    assert "no certificate" in comparison["quantity"] and result["verdict"] == "pass"


def _samples_shard(psnrs: list[float | None]) -> dict[str, Any]:
    levels: list[dict[str, Any]] = []
    for value, psnr in zip((8, 4, 2), psnrs, strict=False):
        if psnr is None:
            levels.append({"value": value, "skipped": "operator unavailable"})
        else:
            values = {"psnr": [psnr], "ssim": [0.5], "relative_error": [0.1]}
            levels.append({"value": value, "values": values})
    return {"field": "acceleration", "indices": [0], "levels": levels}


@pytest.mark.parametrize(("bound", "passed"), [(3.0 + EPS, True), (3.0 - EPS, False)])
def test_more_samples_largest_fall(bound: float, passed: bool) -> None:
    check = {"accelerations": [8, 4, 2], "threshold": {"max_psnr_drop": bound}}
    comparison = _only(_merge("more_samples", check, [_samples_shard([20.0, 17.0, 30.0])]))
    assert comparison["measured"] == pytest.approx(3.0) and comparison["passed"] is passed


def test_more_samples_monotone_passes_with_zero() -> None:
    check = {"accelerations": [8, 4, 2], "threshold": {"max_psnr_drop": 0.5}}
    comparison = _only(_merge("more_samples", check, [_samples_shard([20.0, 25.0, 30.0])]))
    assert comparison["measured"] == 0.0 and comparison["passed"]


def test_more_samples_with_one_level_run_is_not_measured_and_fails() -> None:
    check = {"accelerations": [8, 4, 2], "threshold": {"max_psnr_drop": 50.0}}
    result = _merge("more_samples", check, [_samples_shard([20.0, None, None])])
    assert result["monotone"] is None
    comparison = _only(result)
    assert comparison["measured"] is None and not comparison["passed"]
    assert result["verdict"] == "fail"
