"""The ℓ2 query-only attack of endpoint classifiers (workers/engine/jacobian_attack.py): linearised
steps on finite-difference Jacobians of the logits, then Square on the queries left. Exact
answers on linear classifiers (the closed-form distance to the nearest boundary), exact query
counts, and a small CNN against the white-box AutoAttack."""

from __future__ import annotations

import pytest
import torch

from schemas.checks_classifier import AdversarialCheck
from tests.engine.classifier_fixtures import spec
from tests.engine.test_adversarial_query_only import (
    endpoint,
    exact_distances,
    linear_multiclass,
    run_check,
)
from workers.engine import classifier_attacks
from workers.engine.classifier_attacks import SQUARE_QUERIES, perturbation_norm, run_query_only
from workers.engine.classifiers import UnitBoxClassifier, classifier_subject
from workers.engine.context import PassCounter
from workers.engine.jacobian_attack import (
    JACOBIANS,
    fd_jacobian,
    jacobians_within,
    queries_per_jacobian,
    run_jacobian_l2,
)

BUDGET = SQUARE_QUERIES + 4


def box_model(model: torch.nn.Module, classes: int, side: int) -> UnitBoxClassifier:
    return classifier_subject(model, spec(classes, shape=(1, side, side)), PassCounter()).box_model


@pytest.mark.parametrize(
    ("classes", "side", "seed"), [(3, 8, 1), (10, 8, 2), (17, 12, 3), (10, 16, 4), (3, 12, 5)]
)
def test_linear_classifiers_are_broken_exactly_past_their_distance(
    classes: int, side: int, seed: int
) -> None:
    """A linear classifier W x + b: the exact ℓ2 distance of each input to its nearest boundary
    is min over k ≠ y of (z_y − z_k)/‖w_y − w_k‖ (the inputs lie well inside the box). At
    1.05× that distance every input is broken, by a point queried, misclassified and inside
    the ball; at 0.95× none is, and every image's queries are the counted maximum."""
    model, x, labels = linear_multiclass(classes, side, seed, count=12)
    distances = exact_distances(model, x, labels, "l2")
    correct = distances > 0
    x, labels, distances = x[correct], labels[correct], distances[correct].float()
    # no coordinate of a perturbation of ℓ2 norm 1.05 × 0.3 reaches the box from [0.35, 0.65]
    assert float(distances.max()) < 0.3
    box = box_model(model, classes, side)
    jacobians = jacobians_within(side * side, classes, BUDGET)
    assert jacobians == JACOBIANS

    above = run_jacobian_l2(box, x, labels, 1.05 * distances, jacobians)
    assert bool(above.broken.all())
    with torch.no_grad():
        assert bool((box(above.points).argmax(dim=1) != labels).all())
    assert bool((perturbation_norm(above.points - x, "l2") <= 1.05 * distances).all())
    # a linear model's first Jacobian is exact: its first candidates break every input
    assert bool((above.spent == 1 + side * side + min(3, classes - 1)).all())

    below = run_jacobian_l2(box, x, labels, 0.95 * distances, jacobians)
    assert not bool(below.broken.any())
    assert bool((below.points == x).all())
    assert bool((below.spent == 1 + jacobians * queries_per_jacobian(side * side, classes)).all())


def test_the_finite_difference_jacobian_of_a_linear_model_is_its_weight() -> None:
    model, x, _ = linear_multiclass(5, 8, 6, count=3)
    x[0, 0, 0, 0] = 1.0  # a step backwards at the box's face
    box = box_model(model, 5, 8)
    with torch.no_grad():
        logits = box(x)
    jacobian = fd_jacobian(box, x, logits)
    assert jacobian.shape == (3, 5, 64)
    assert torch.allclose(jacobian, model.weight.expand(3, 5, 64), atol=2e-2)


@pytest.mark.parametrize(("classes", "side", "seed"), [(17, 12, 9)])
def test_l2_check_on_linear_classifiers_is_exact(classes: int, side: int, seed: int) -> None:
    """The check through an endpoint, ℓ2, default budget, epsilons between the exact distances
    (test_adversarial_query_only.py has 3 and 10 classes; 12×12 is an image Square runs padded):
    the exact robust accuracy at every level, every image broken by the Jacobian attack, its
    queries charged to its level, none with autograd on."""
    model, x, labels = linear_multiclass(classes, side, seed)
    distances = exact_distances(model, x, labels, "l2")
    positive = sorted(float(d) for d in distances if d > 0)
    epsilons = [
        (positive[3] * positive[4]) ** 0.5,
        (positive[len(positive) - 4] * positive[len(positive) - 3]) ** 0.5,
    ]
    check = AdversarialCheck.model_validate({"norm": "l2", "epsilons": epsilons})
    module, client = endpoint(model, classes)
    result = run_check(check, module, spec(classes, shape=(1, side, side)), x, labels, seed)
    assert (result["attack"], result["attacks"]) == ("jacobian", ["jacobian", "square"])
    assert result["jacobian"]["jacobians"] == JACOBIANS
    assert result["jacobian"]["queries_per_image"] == BUDGET
    for level, eps in zip(result["levels"], epsilons, strict=True):
        assert level["robust"] == int((distances > eps).sum()), level
        assert set(level["broken_by"]) <= {"jacobian"}
    assert client.grad_enabled == 0
    attacked = int((distances > 0).sum())
    robust = int((distances > epsilons[0]).sum())
    # the broken images stop after their first iteration; the robust ones spend the budget
    # but Square's verification (none where Square's last point is not adversarial)
    spend = 1 + side * side + min(3, classes - 1)
    assert client.sent["adversarial", epsilons[0]] == (
        (attacked - robust) * spend + robust * (BUDGET - 1)
    )


def test_the_budget_is_spent_exactly_and_square_gets_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At an ε nothing reaches, every image costs SQUARE_QUERIES + 3 queries: the Jacobian
    attack's, and Square's iterations, start, first and last point (+ 1 to verify a point
    Square found: SQUARE_QUERIES + 4 at most).
    Below two Jacobians' worth of queries (beside Square's reserve) Square runs alone."""
    model, x, labels = linear_multiclass(3, 8, 8, count=6)
    correct = exact_distances(model, x, labels, "l2") > 0
    x, labels = x[correct], labels[correct]
    module, client = endpoint(model, 3)
    box = box_model(module, 3, 8)
    monkeypatch.setattr(classifier_attacks, "SQUARE_QUERIES", 1500)
    outcome = run_query_only(box, x, labels, "l2", 1e-4, seed=1)
    assert not bool(outcome.broken.any())
    assert outcome.attacks == ["jacobian", "square"]
    assert outcome.jacobians == jacobians_within(64, 3, 1504) == 5
    assert client.sent["audit", None] == len(x) * 1503
    monkeypatch.setattr(classifier_attacks, "SQUARE_QUERIES", 1000)
    alone = run_query_only(box, x, labels, "l2", 1e-4, seed=1)
    assert (alone.attacks, alone.jacobians) == (["square"], 0)
    assert client.sent["audit", None] == len(x) * (1503 + 1003)


class SmallCNN(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.head = torch.nn.Linear(6 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(h.flatten(1))


def test_a_small_cnn_against_the_white_box_autoattack() -> None:
    """A random ReLU CNN (10×10, 4 classes, its biases centred on the inputs), 10 inputs, ℓ2
    at an ε where the white-box AutoAttack breaks some but not all: the query-only attack
    through an endpoint breaks as many, an image less at most, the Jacobian attack among
    them."""
    model = SmallCNN(0).eval()
    gen = torch.Generator().manual_seed(1)
    x = 0.3 + 0.4 * torch.rand((10, 1, 10, 10), generator=gen)
    with torch.no_grad():
        model.head.bias -= model(x).mean(dim=0)  # every class predicted for some inputs
        labels = model(x).argmax(dim=1)
    model_spec = spec(4, shape=(1, 10, 10))
    # the white-box minimal ℓ2 norms (FMN, DeepFool) are 0.001 to 0.10: 8 below ε (the largest
    # 0.070 = 0.93 ε), 2 above (0.090, 0.105)
    eps = 0.075
    white = run_check(
        AdversarialCheck.model_validate({"norm": "l2", "epsilons": [eps], "attack": "autoattack"}),
        model,
        model_spec,
        x,
        labels,
    )
    module, client = endpoint(model, 4)
    check = AdversarialCheck.model_validate({"norm": "l2", "epsilons": [eps]})
    ours = run_check(check, module, model_spec, x, labels)
    broken_white = len(x) - white["levels"][0]["robust"]
    broken_ours = len(x) - ours["levels"][0]["robust"]
    assert 0 < broken_white < len(x)
    assert broken_ours >= broken_white - 1, (broken_ours, broken_white)
    assert "jacobian" in ours["levels"][0]["broken_by"]
    assert client.grad_enabled == 0
