"""`minimal_perturbation`: on a linear classifier the smallest adversarial perturbation is known
exactly: min over classes k ≠ y of (z_y − z_k) / ‖w_y − w_k‖_* (‖·‖₂ for ℓ2, ‖·‖₁ for ℓ∞; for
two classes in logit-difference form |w·x + b| / ‖w‖_*), as long as the value range does not get
in the way, which every fixture here checks. The attacks run with their default settings at
value ranges from [0, 1] to 600 wide, at distances from 1/1000 to 1/10 of the range."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from schemas.checks_classifier import MinimalPerturbationCheck
from schemas.model_spec import ModelSpec
from tests.engine.classifier_fixtures import (
    SHAPE,
    LogitDifference,
    context,
    linear_minimal_l2,
    low_ranked_nearest,
    spec,
    subject,
)
from workers.engine import classifier_attacks
from workers.engine.checks.minimal_perturbation import MinimalPerturbation, quantile
from workers.engine.classifiers import ClassifierSubject
from workers.engine.digits import digits
from workers.engine.model_loading import load_model

KIND = MinimalPerturbation()
RANGES = [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0), (-300.0, 300.0)]
ATTACKS = [("fmn", "l2"), ("ddn", "l2"), ("deepfool", "l2"), ("fmn", "linf"), ("deepfool", "linf")]
MISCLASSIFIED = 2  # the first rows of every fixture carry a wrong label
TOLERANCE = 2e-3  # relative, on every minimal norm of a linear model (the issue asked for 1 %)
# below exact by at most the float32 resolution of the unit box (relative, at the smallest
# distances of the fixtures: 1/1000 of the range); measured: never below
FLOAT_ERROR = 1e-5
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "classifier"


class Linear(torch.nn.Module):
    """K-class linear classifier, logits W x + b."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


class Thresholded(torch.nn.Module):
    """The two-class classifier behind a step function: the same decisions, no gradient (the
    extreme of gradient masking)."""

    def __init__(self, linear: LogitDifference) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = torch.sign(self.linear.f(x))
        return torch.stack([-side / 2, side / 2], dim=1)


class SmallNet(torch.nn.Module):
    """A random ReLU network (16 → 32 → 3), curved enough that the attacks must iterate."""

    def __init__(self, seed: int = 0, inputs: int = 16, hidden: int = 32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("a", torch.randn((hidden, inputs), generator=gen) * 4 / inputs**0.5)
        self.register_buffer("b", torch.randn(hidden, generator=gen) / 2)
        self.register_buffer("c", torch.randn((3, hidden), generator=gen) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.flatten(1) @ self.a.T + self.b) @ self.c.T


def two_class(
    value_range: tuple[float, float], count: int = 12, seed: int = 0, shape: tuple = SHAPE
) -> tuple[LogitDifference, torch.Tensor, torch.Tensor]:
    """Points around the middle of the range at exact distances from 1/1000 to 1/10 of its
    width, on alternate sides of the boundary through the middle."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = value_range
    width = hi - lo
    n = math.prod(shape)
    w = torch.randn(n, generator=gen)
    middle = torch.full((n,), (lo + hi) / 2)
    offsets = (torch.rand((count, n), generator=gen) - 0.5) * 0.2 * width
    offsets -= (offsets @ w)[:, None] * w / (w @ w)  # onto the boundary
    distance = width * 10 ** (-1 - 2 * torch.rand(count, generator=gen))
    side = torch.tensor([1.0, -1.0]).repeat(count)[:count]
    x = (middle + offsets + (side * distance)[:, None] * w / w.norm()).view(count, *shape)
    model = LogitDifference(w.view(shape), -float(w @ middle))
    labels = (model.f(x) > 0).long()
    labels[:MISCLASSIFIED] = 1 - labels[:MISCLASSIFIED]
    return model, x, labels


def multi_class(
    value_range: tuple[float, float], classes: int = 4, count: int = 12, seed: int = 1
) -> tuple[Linear, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = value_range
    n = math.prod(SHAPE)
    weight = torch.randn((classes, n), generator=gen)
    middle = torch.full((n,), (lo + hi) / 2)
    x = middle + (torch.rand((count, n), generator=gen) - 0.5) * 0.1 * (hi - lo)
    model = Linear(weight, -weight @ middle)
    labels = model(x).argmax(dim=1)
    labels[:MISCLASSIFIED] = (labels[:MISCLASSIFIED] + 1) % classes
    return model, x.view(count, *SHAPE), labels


def exact_norms(
    classifier: ClassifierSubject, x: torch.Tensor, labels: torch.Tensor, norm: str
) -> torch.Tensor:
    """The minimal norm of every correctly classified row (0 for the others), for the image the
    model sees (x through the unit box and back), after checking that the minimiser lies in the
    value range."""
    seen = classifier.from_unit(classifier.to_unit(x)).flatten(1).double()
    model = classifier.box_model.model
    if isinstance(model, LogitDifference):
        w = model.w.double()
        weight, bias = torch.stack([-w / 2, w / 2]), torch.tensor([-model.b / 2, model.b / 2])
    else:
        weight, bias = model.weight.double(), model.bias.double()
    logits = seen @ weight.T + bias.double()
    out = torch.zeros(len(x), dtype=torch.double)
    lo, hi = classifier.value_range
    for row, label in enumerate(labels.tolist()):
        if int(logits[row].argmax()) != label:
            continue
        normals = weight[label] - weight  # the margin to class k grows along row k
        gaps = logits[row, label] - logits[row]
        duals = normals.norm(p=1 if norm == "linf" else 2, dim=1)
        distances = torch.where(duals > 0, gaps / duals, torch.inf)
        distances[label] = torch.inf
        k = int(distances.argmin())
        unit = normals[k].sign() if norm == "linf" else normals[k] / duals[k]
        minimiser = seen[row] - distances[k] * unit
        assert lo <= float(minimiser.min()) and float(minimiser.max()) <= hi  # box not active
        out[row] = distances[k]
    return out


def run(
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    check: dict[str, Any],
    value_range: tuple[float, float],
    shape: tuple = SHAPE,
) -> tuple[dict[str, Any], ClassifierSubject]:
    config = MinimalPerturbationCheck.model_validate(check)
    with torch.no_grad():
        classes = int(model(x[:1]).shape[1])
    classifier = subject(model, spec(classes, value_range, shape))
    shard = KIND.run(config, context(x, labels), classifier, range(len(x)), 0)
    return KIND.merge(config, [shard]), classifier


def assert_exact(
    result: dict[str, Any], exact: torch.Tensor, attack: str | set[str], correct: torch.Tensor
) -> None:
    """Every correctly classified input within TOLERANCE above its exact norm and never below
    it by more than float error (FLOAT_ERROR: below exact would be a point that is not
    adversarial), credited to `attack` (one of them); every misclassified input at 0."""
    allowed = {attack} if isinstance(attack, str) else attack
    for image, truth, right in zip(result["per_image"], exact.tolist(), correct, strict=True):
        if not right:
            assert image["norm"] == 0.0 and image["found_by"] is None
            continue
        assert image["found_by"] in allowed, image  # the configured attack itself, no fallback
        # measured: within 1.6e-4 (the bisection's margin past the boundary is 1e-4)
        assert truth * (1 - FLOAT_ERROR) <= image["norm"] <= truth * (1 + TOLERANCE), (
            image,
            truth,
        )
    counts = result["found_by"]
    assert set(counts) <= allowed and sum(counts.values()) == int(correct.sum())


@pytest.mark.parametrize("value_range", RANGES)
@pytest.mark.parametrize(("attack", "norm"), ATTACKS)
def test_two_class_linear_exact_at_every_value_range(
    attack: str, norm: str, value_range: tuple[float, float]
) -> None:
    """Default settings; the logits grow with the range. With adv-lib's own schedules and no
    bisection FMN found 5 to 9 of the 10, DDN stopped up to 4.4× and DeepFool up to 1.09×
    (ℓ∞: 1.23×) above the exact norm."""
    model, x, labels = two_class(value_range)
    result, classifier = run(model, x, labels, {"attack": attack, "norm": norm}, value_range)
    correct = classifier.predict(x) == labels
    assert int(correct.sum()) == len(x) - MISCLASSIFIED
    assert_exact(result, exact_norms(classifier, x, labels, norm), attack, correct)
    assert result["not_found"] == 0 and result["found_by"] == {attack: len(x) - MISCLASSIFIED}


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-300.0, 300.0)])
@pytest.mark.parametrize(("attack", "norm"), ATTACKS)
def test_multi_class_linear(attack: str, norm: str, value_range: tuple[float, float]) -> None:
    """FMN and DeepFool find the nearest of three boundaries themselves. DDN follows the
    cross-entropy, which can settle on another class's boundary (alone: one input of ten, 3.8 %
    above); the ensemble's DeepFool run, or DDN targeted at the nearest linearised boundary,
    then gives the exact norm."""
    model, x, labels = multi_class(value_range)
    result, classifier = run(model, x, labels, {"attack": attack, "norm": norm}, value_range)
    correct = classifier.predict(x) == labels
    exact = exact_norms(classifier, x, labels, norm)
    allowed = {"ddn", "deepfool"} if attack == "ddn" else {attack}
    assert_exact(result, exact, allowed, correct)


# (classes, value range, seed): 3 to 50 classes on every range, 1000 on a 1×4×4 input
LOW_RANKED = [
    (classes, value_range, seed)
    for seed, (classes, value_range) in enumerate(
        (classes, value_range) for classes in (3, 4, 12, 50) for value_range in RANGES
    )
] + [(1000, (0.0, 255.0), 16)]


@pytest.mark.parametrize("attack", [None, "fmn", "ddn", "deepfool"])
@pytest.mark.parametrize(("classes", "value_range", "seed"), LOW_RANKED)
def test_nearest_boundary_of_the_lowest_ranked_class(
    attack: str | None, classes: int, value_range: tuple[float, float], seed: int
) -> None:
    """The nearest boundary of every input belongs to the class with the LOWEST logit (checked
    on the float64 construction). Default settings (`None`: the check's defaults), ℓ2: every
    input within TOLERANCE of the exact norm, never below it. Before the ensemble (estimates
    over the 9 runners-up, DeepFool only as a fallback): FMN 1.6-2.0× the exact norm in the
    median with 12 and 50 classes, DDN 1.6-3.7× with 3 to 50."""
    model, x, labels = low_ranked_nearest(classes, value_range, count=8, seed=seed)
    check = {} if attack is None else {"attack": attack}
    result, classifier = run(model, x, labels, check, value_range)
    seen = classifier.from_unit(classifier.to_unit(x))
    exact, nearest = linear_minimal_l2(model, seen, labels, value_range)
    with torch.no_grad():
        lowest = (seen.flatten(1).double() @ model.weight.double().T).add(model.bias).argmin(1)
    correct = classifier.predict(x) == labels
    assert int(correct.sum()) == len(x) - MISCLASSIFIED
    assert all(int(nearest[i]) == int(lowest[i]) for i in range(len(x)) if correct[i])
    # DeepFool always runs; DDN may lose to it (alone it settles on another boundary)
    allowed = {attack or "fmn", "deepfool"}
    assert_exact(result, exact, allowed, correct)
    assert exact_norms(classifier, x, labels, "l2").tolist() == pytest.approx(exact.tolist())
    found = [i["norm"] for i in result["per_image"] if i["found_by"]]
    assert result["norms_found"]["median"] == pytest.approx(float(np.median([0, 0, *found])))


@pytest.mark.parametrize("attack", ["fmn", "deepfool"])
@pytest.mark.parametrize("classes", [4, 12])
def test_nearest_boundary_of_the_lowest_ranked_class_linf(attack: str, classes: int) -> None:
    """The same models in ℓ∞ (the nearest boundary is whichever minimises the gap over
    ‖w_y − w_k‖₁; computed, not built): every input within TOLERANCE, never below."""
    model, x, labels = low_ranked_nearest(classes, (-1.0, 1.0), count=8, seed=classes)
    result, classifier = run(model, x, labels, {"attack": attack, "norm": "linf"}, (-1.0, 1.0))
    correct = classifier.predict(x) == labels
    exact = exact_norms(classifier, x, labels, "linf")
    assert_exact(result, exact, {attack, "deepfool"}, correct)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize(("classes", "elements"), [(12, 2**22), (1000, 2**22), (1000, 700)])
def test_linearised_estimate_covers_every_class(norm: str, classes: int, elements: int) -> None:
    """On a linear model the first estimate is exact: the class of the nearest boundary (the
    lowest-ranked one here) and the step to it, whatever the chunking of the classes (700
    input values: 5 classes per chunk of 8 inputs of 16)."""
    model, x, labels = low_ranked_nearest(classes, (0.0, 1.0), count=8, seed=3, misclassified=0)
    classifier = subject(model, spec(classes, (0.0, 1.0)))
    u = classifier.to_unit(x)
    original = classifier_attacks._JACOBIAN_ELEMENTS
    classifier_attacks._JACOBIAN_ELEMENTS = elements
    try:
        step, margin, nearest = classifier_attacks.linearised_step(
            classifier.box_model, u, labels, norm
        )
    finally:
        classifier_attacks._JACOBIAN_ELEMENTS = original
    weight, bias = model.weight.double(), model.bias.double()
    logits = u.flatten(1).double() @ weight.T + bias
    for row in range(len(x)):
        y = int(labels[row])
        normals = weight[y] - weight
        duals = normals.norm(p=1 if norm == "linf" else 2, dim=1)
        distances = (logits[row, y] - logits[row]) / duals
        distances[y] = torch.inf
        k = int(distances.argmin())
        unit = normals[k].sign() if norm == "linf" else normals[k] / duals[k]
        assert int(nearest[row]) == k
        if norm == "l2":
            assert k == int(logits[row].argmin())
        expected = -distances[k] * unit
        assert step[row].flatten().double().tolist() == pytest.approx(
            expected.tolist(), rel=1e-4, abs=1e-6 * float(expected.abs().max())
        )
        runner_up = float((logits[row, y] - logits[row]).sort().values[1])
        assert float(margin[row]) == pytest.approx(runner_up, rel=1e-4)


def test_every_point_kept_is_verified_and_the_smallest() -> None:
    """minimal_adversarial itself (DDN, which alone stops 1.6-2× above on this model): every
    point it keeps lies in the box and is adversarial when the model is re-run on it, at the
    exact norm within TOLERANCE."""
    model, x, labels = low_ranked_nearest(12, (0.0, 1.0), count=8, seed=5, misclassified=0)
    classifier = subject(model, spec(12, (0.0, 1.0)))
    u = classifier.to_unit(x)
    config = MinimalPerturbationCheck.model_validate({"attack": "ddn"})
    with classifier_attacks.seeded(0, u.device):
        outcome = classifier_attacks.minimal_adversarial(
            classifier.box_model, u, labels, config.threat_model(), config.search_settings()
        )
    assert all(by in ("ddn", "deepfool") for by in outcome.found_by)
    fooled = classifier_attacks.is_adversarial(classifier.box_model, outcome.points, labels)
    assert bool(fooled.all())
    assert float(outcome.points.min()) >= 0.0 and float(outcome.points.max()) <= 1.0
    kept = classifier_attacks.perturbation_norm(outcome.points - u, "l2").double()
    exact, _ = linear_minimal_l2(model, classifier.from_unit(u), labels, (0.0, 1.0))
    assert ((kept / exact - 1).abs() <= TOLERANCE).all(), kept / exact


@pytest.mark.parametrize(("attack", "norm"), ATTACKS)
def test_norms_do_not_depend_on_the_width_of_the_value_range(attack: str, norm: str) -> None:
    """The same network and images (values within ±0.3, far from either box) declared on
    [-1, 1] and on [-300, 300]: the unit box the attacks run in shrinks every distance 300-fold.
    Measured: medians within 0.2 %, every input within 11 % (DeepFool and DDN take other paths
    on a few); with adv-lib's own schedules DDN's norms grew 1.5-fold in the median and up to
    5.4-fold, FMN's ℓ∞ norms up to 1.29-fold."""
    model = SmallNet()
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand((16, *SHAPE), generator=gen) - 0.5) * 0.6
    labels = model(x).argmax(dim=1)
    norms = []
    for value_range in ((-1.0, 1.0), (-300.0, 300.0)):
        result = run(model, x, labels, {"attack": attack, "norm": norm}, value_range)[0]
        assert result["not_found"] == 0
        norms.append(torch.tensor([image["norm"] for image in result["per_image"]]))
    ratios = norms[1] / norms[0]
    assert float(ratios.median()) == pytest.approx(1.0, abs=0.02)
    assert float(ratios.min()) >= 0.85 and float(ratios.max()) <= 1.15, ratios


def test_ddn_at_confidently_classified_inputs() -> None:
    """3×32×32 inputs on [0, 255] with logit margins in the thousands: untempered, DDN's
    cross-entropy gradient underflows to zero at the clean input and it wanders in random
    directions (measured: up to 28× the exact norm)."""
    shape = (3, 32, 32)
    model, x, labels = two_class((0.0, 255.0), count=8, shape=shape)
    model.w *= 100.0  # the same boundary, margins ×100
    model.b *= 100.0
    result, classifier = run(model, x, labels, {"attack": "ddn"}, (0.0, 255.0), shape)
    assert min(abs(float(f)) for f in model.f(x)[MISCLASSIFIED:]) > 1000
    correct = classifier.predict(x) == labels
    assert_exact(result, exact_norms(classifier, x, labels, "l2"), "ddn", correct)


def test_the_next_attack_fills_in_what_the_first_misses() -> None:
    """Behind a step function FMN and DeepFool see no gradient and find nothing; DDN's random
    directions do, and bisection brings them to the boundary: an upper bound on the exact norm."""
    linear, x, labels = two_class((0.0, 1.0))
    model = Thresholded(linear)
    exact = exact_norms(subject(linear, spec(2, (0.0, 1.0))), x, labels, "l2")
    for first, chain in (
        ("fmn", ["fmn", "ddn", "deepfool"]),
        ("deepfool", ["deepfool", "fmn", "ddn"]),
    ):
        result, _ = run(model, x, labels, {"attack": first}, (0.0, 1.0))
        assert result["attacks"] == chain
        assert result["not_found"] == 0 and result["found_by"] == {"ddn": len(x) - MISCLASSIFIED}
        pairs = zip(result["per_image"], exact.tolist(), strict=True)
        for image, truth in list(pairs)[MISCLASSIFIED:]:
            assert image["found_by"] == "ddn"
            assert truth * (1 - 1e-3) <= image["norm"] < math.inf


def test_nothing_found_is_infinite_and_fails_closed() -> None:
    """ℓ∞ behind the step function: no attack of the chain (DDN is ℓ2 only) finds anything."""
    linear, x, labels = two_class((0.0, 1.0))
    check: dict[str, Any] = {"norm": "linf", "threshold": {"min_median_norm": 0.01}}
    result, _ = run(Thresholded(linear), x, labels, check, (0.0, 1.0))
    assert result["attacks"] == ["fmn", "deepfool"]
    assert result["not_found"] == len(x) - MISCLASSIFIED and result["found_by"] == {}
    # 2 of 12 misclassified (norm 0), 10 at +∞
    assert result["norms"] == {"median": None, "q10": 0.0, "q90": None, "min": 0.0, "max": None}
    assert result["verdict"] == "fail"
    assert any("median is +∞" in w for w in result["warnings"])
    check["threshold"]["unmeasured_median"] = "pass"
    assert run(Thresholded(linear), x, labels, check, (0.0, 1.0))[0]["verdict"] == "pass"


def _merged(norms: list[float | None], threshold: dict[str, Any] | None) -> dict[str, Any]:
    images = [
        {"index": i, "label": 0, "norm": n, "found_by": None if not n else "fmn"}
        for i, n in enumerate(norms)
    ]
    config = MinimalPerturbationCheck.model_validate({"threshold": threshold})
    return KIND.merge(config, [{"images": images[:2]}, {"images": images[2:]}])


def test_not_found_counts_as_infinite_in_the_quantiles() -> None:
    found = [0.0, 1.0, 2.0, 4.0]
    result = _merged([*found, None], None)
    assert result["norms"]["median"] == 2.0  # the middle of 0, 1, 2, 4, +∞ (found only: 1.5)
    assert result["norms"]["q10"] == pytest.approx(float(np.quantile([*found, 5.0], 0.1)))
    # q90 lies between 4 and +∞: the lower one; the largest is +∞
    assert result["norms"]["q90"] == 4.0 and result["norms"]["max"] is None
    assert result["norms_found"] == {
        "median": 1.5,
        "q10": pytest.approx(float(np.quantile(found, 0.1))),
        "q90": pytest.approx(float(np.quantile(found, 0.9))),
        "min": 0.0,
        "max": 4.0,
    }
    assert result["not_found"] == 1 and result["found_by"] == {"fmn": 3}
    assert result["per_image"][4] == {"index": 4, "norm": None, "found_by": None}
    curve = {point["epsilon"]: point["accuracy"] for point in result["accuracy_curve"]}
    assert curve == {1.0: 0.6, 2.0: 0.4, 4.0: 0.2}  # not found: robust at every ε


@pytest.mark.parametrize(
    ("norms", "threshold", "verdict"),
    [
        ([1.0, 3.0, None, None], 2.0, "pass"),  # half not found: the median is 3, the lower one
        ([1.0, 3.0, None, None], 3.5, "fail"),
        ([1.0, None, None], 0.5, "fail"),  # more than half: +∞, fail closed
        ([0.0, 0.0, None], 0.5, "fail"),  # two misclassified: median 0
    ],
)
def test_verdict_on_the_median_with_inputs_not_found(
    norms: list[float | None], threshold: float, verdict: str
) -> None:
    result = _merged(norms, {"min_median_norm": threshold})
    assert result["verdict"] == verdict
    unmeasured = result["norms"]["median"] is None
    assert unmeasured == any("median is +∞" in w for w in result["warnings"])


def test_quantile_matches_numpy_on_finite_values() -> None:
    values = sorted(np.random.default_rng(0).exponential(size=9).tolist())
    for q in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    assert quantile([1.0, math.inf], 0.5) == 1.0 and quantile([math.inf], 0.5) == math.inf


def test_shards_without_found_by_still_merge() -> None:
    """Shards stored by an earlier version (no `found_by`) merge with new ones on resume."""
    config = MinimalPerturbationCheck()
    old = {
        "images": [{"index": 0, "label": 1, "norm": 0.5}, {"index": 1, "label": 1, "norm": None}]
    }
    new = {"images": [{"index": 2, "label": 0, "norm": 0.7, "found_by": "ddn"}]}
    result = KIND.merge(config, [old, new])
    assert result["found_by"] == {"ddn": 1} and result["not_found"] == 1
    assert [i["found_by"] for i in result["per_image"]] == [None, None, "ddn"]


def test_threshold_on_the_median() -> None:
    model, x, labels = two_class((0.0, 1.0))
    median = run(model, x, labels, {}, (0.0, 1.0))[0]["norms"]["median"]
    verdicts = [
        run(model, x, labels, {"threshold": {"min_median_norm": median * f}}, (0.0, 1.0))[0][
            "verdict"
        ]
        for f in (0.99, 1.01)
    ]
    assert verdicts == ["pass", "fail"]


def test_ddn_refuses_linf() -> None:
    with pytest.raises(ValueError, match="l2 norm only"):
        MinimalPerturbationCheck.model_validate({"attack": "ddn", "norm": "linf"})


def test_reference_classifier_every_correct_input_gets_a_norm() -> None:
    """The reference classifier on the 32 digits of its audit, default settings (ℓ2, FMN, 100
    steps): an adversarial point for every correctly classified input, found by FMN itself
    (adv-lib's FMN with its own settings: 16 of 32), no norm more than 2 % above DDN's (default
    settings too; measured: at most 0.8 %; FMN from the linearised walk's point alone: up to
    45 %)."""
    model_spec = ModelSpec.model_validate(json.loads((EXAMPLE / "spec.json").read_text()))
    model = load_model(EXAMPLE / "model.safetensors", "safetensors", model_spec, "cpu")
    x, labels = digits(32, 28, seed=0)
    results = {}
    for attack in ("fmn", "ddn"):
        config = MinimalPerturbationCheck.model_validate({"attack": attack})
        classifier = subject(model, model_spec)
        shard = KIND.run(config, context(x, labels), classifier, range(len(x)), 0)
        results[attack] = KIND.merge(config, [shard])
    correct = int((classifier.predict(x) == labels).sum())
    fmn = results["fmn"]
    assert correct >= 30
    assert fmn["not_found"] == 0 and fmn["found_by"] == {"fmn": correct}
    assert all(0 < image["norm"] < math.inf for image in fmn["per_image"] if image["found_by"])
    pairs = zip(fmn["per_image"], results["ddn"]["per_image"], strict=True)
    assert all(a["norm"] <= 1.02 * b["norm"] for a, b in pairs if a["found_by"])
