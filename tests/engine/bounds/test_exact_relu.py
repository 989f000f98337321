"""U ≥ exact ≥ L on hundreds of random small ReLU networks whose exact worst change is known.

Each case: a random Linear/ReLU network (2 to 4 perturbation entries, one to three hidden layers,
at most 9 ReLUs, 1 to 4 outputs), a random ball centre and an ℓ∞ radius from 0.02 to 2, and for
one case in four a random matrix K in front (the network reads K(y + e), as an `adjoint` model
reads A*(y + e)). The exact worst change over the ball, for the ℓ2 and the ℓ∞ norm of the
change, comes from enumerating the vertices of the regions of linearity
(`exact_relu.vertex_maximum`); its ℓ∞ figure is checked against the mixed-integer program
(`exact_relu.milp_extremes`, HiGHS), and it is checked to be at least every sampled point's
change and the gradient search's. Then every certified figure (IBP, CROWN, CROWN-linear) must be
at least the exact value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests.engine.bounds.exact_relu import (
    interval_bounds,
    layers_of,
    milp_extremes,
    random_network,
    vertex_maximum,
)
from tests.engine.bounds.search import found_worst
from workers.engine.bounds import (
    Certificate,
    LinearMap,
    ball,
    certify_output_change,
    through_linear_map,
)

CASES = 200
GROUPS = 5
# the exact value is a float64 evaluation at a computed vertex; a sampled point or a search can
# match it, never beat it by more than rounding
ROUNDING = 1e-9


@dataclass
class Outcome:
    seed: int
    exact_l2: float
    exact_linf: float
    upper_l2: float  # the default certificate (intermediate bounds from IBP)
    tight_l2: float  # intermediate bounds from CROWN
    tight_linf: float
    found: float  # the gradient search's ℓ2 change
    stable: bool  # every ReLU on one side over the whole ball


def _case(seed: int):
    """A random network, centre, radius (and K for one case in four) with a nonzero change."""
    rng = np.random.default_rng([2026, seed])
    while True:
        d = int(rng.integers(2, 5))
        shape = int(rng.integers(0, 10))
        if shape < 5:
            widths: tuple[int, ...] = (int(rng.integers(2, 9)),)
        elif shape < 9:
            first = int(rng.integers(2, 6))
            widths = (first, int(rng.integers(2, 10 - first)))
        else:
            d = min(d, 3)
            widths = tuple(int(w) for w in rng.integers(2, 4, size=3))
        outputs = int(rng.integers(1, 5))
        measured = seed % 4 == 3
        n_in = int(rng.integers(d, 7)) if measured else d
        model = random_network(rng, n_in, widths, outputs)
        K = rng.normal(size=(n_in, d)) / math.sqrt(d) if measured else None
        y = rng.normal(size=d) * float(rng.choice([0.5, 2.0]))
        eps = float(np.exp(rng.uniform(math.log(0.02), math.log(2.0))))
        layers = layers_of(model, K)
        exact = vertex_maximum(layers, y, y - eps, y + eps)
        if exact.l2 > 1e-6:  # a network constant on the ball (all ReLUs off) is resampled
            return model, layers, K, y, eps, exact


def _outcome(seed: int) -> Outcome:
    model, layers, K, y, eps, exact = _case(seed)
    point = torch.from_numpy(y)[None]
    if K is None:
        into = None
        inputs = ball(point, eps, "linf")
    else:
        k = torch.from_numpy(K)

        def into(v: torch.Tensor) -> torch.Tensor:
            return v @ k.T

        linear_map = LinearMap(into, k, (k.shape[1],), (k.shape[0],))
        inputs = through_linear_map(linear_map, point, eps, "linf")

    def change(e: np.ndarray) -> torch.Tensor:
        v = torch.from_numpy(np.atleast_2d(e))
        with torch.no_grad():
            return model(into(v) if into else v) - model(into(point) if into else point)

    # the exact figures, re-evaluated by the model itself at the maximisers
    exact_l2 = float(change(exact.l2_point).norm())
    exact_linf = float(change(exact.linf_point).abs().max())
    assert exact_l2 == pytest.approx(exact.l2, rel=1e-12, abs=1e-15)
    assert exact_linf == pytest.approx(exact.linf, rel=1e-12, abs=1e-15)

    # the MILP agrees on the ℓ∞ figure (HiGHS's tolerances: about 1e-7 relative to the bounds)
    extremes = milp_extremes(layers, y, y - eps, y + eps)
    milp_value = max(max(top.value, bottom.value) for top, bottom in extremes)
    milp_achieved = max(max(top.achieved, bottom.achieved) for top, bottom in extremes)
    assert milp_value == pytest.approx(exact.linf, rel=1e-6, abs=1e-9), seed
    assert milp_achieved <= exact.linf * (1 + ROUNDING) + 1e-15, seed

    # no sampled point of the ball (corners and inside) and no search beats the exact value
    rng = np.random.default_rng([7, seed])
    corners = y + eps * rng.choice([-1.0, 1.0], size=(256, y.size))
    inside = y + eps * rng.uniform(-1.0, 1.0, size=(256, y.size))
    sampled = change(np.concatenate([corners, inside]))
    assert float(sampled.norm(dim=1).max()) <= exact_l2 * (1 + ROUNDING), seed
    assert float(sampled.abs().max()) <= exact_linf * (1 + ROUNDING), seed
    found = found_worst(model, point, eps, "linf", into=into, samples=64, restarts=8, steps=30)
    assert found <= exact_l2 * (1 + ROUNDING), seed

    # U ≥ exact for every method's figure: the ℓ2 change with intermediate bounds from IBP (the
    # default) and from CROWN, the ℓ∞ change with CROWN's
    upper = {}
    for output, intermediate, value in (
        ("l2", "ibp", exact_l2),
        ("l2", "crown", exact_l2),
        ("linf", "crown", exact_linf),
    ):
        certificate = certify_output_change(model, inputs, output=output, intermediate=intermediate)
        assert isinstance(certificate, Certificate), certificate
        for method, figure in certificate.figures.items():
            assert figure >= value, (
                f"seed {seed}, {output}, {intermediate}, {method}: {figure} < {value}"
            )
        upper[output, intermediate] = certificate.upper
    stable = all(
        bool(((lo >= 0) | (hi <= 0)).all()) for lo, hi in interval_bounds(layers, y - eps, y + eps)
    )
    if stable:
        # affine on the ball (by interval bounds on the network with K composed in), and CROWN
        # with its own intermediate bounds proves it: the ℓ∞ figure is then exact (each
        # coordinate's ε‖J_i‖₁), and so is the ℓ2 one (ε‖J‖_{∞→2} from the sign vectors), up to
        # the margins (about 1e-10 of the magnitude of the sums)
        assert upper["l2", "crown"] <= exact_l2 * (1 + 1e-6) + 1e-8, seed
        assert upper["linf", "crown"] <= exact_linf * (1 + 1e-6) + 1e-8, seed
    return Outcome(
        seed,
        exact_l2,
        exact_linf,
        upper["l2", "ibp"],
        upper["l2", "crown"],
        upper["linf", "crown"],
        found,
        stable,
    )


@pytest.mark.parametrize("group", range(GROUPS))
def test_the_certified_bound_is_above_the_exact_worst_change(group: int) -> None:
    """U ≥ exact ≥ every point found, on each case of the group; U exact where the network is
    affine on the ball; U/exact held to a loose ceiling over the group (its mean and median
    over all the cases are in docs/theorem.md). IBP's intermediate bounds through a dense K
    lose its correlations and make a few cases very loose (up to about 150×), so their ceiling
    is on the median. (Tighter intermediate bounds do not always give a tighter figure: the
    lower line of an unstable ReLU, z or 0, is chosen by its bounds.)"""
    outcomes = [_outcome(seed) for seed in range(group, CASES, GROUPS)]
    assert sum(o.stable for o in outcomes) >= 4
    default = [o.upper_l2 / o.exact_l2 for o in outcomes]
    tight_l2 = [o.tight_l2 / o.exact_l2 for o in outcomes]
    tight_linf = [o.tight_linf / o.exact_linf for o in outcomes]
    assert float(np.median(default)) <= 1.25, default
    assert float(np.mean(tight_l2)) <= 1.5, tight_l2
    assert float(np.mean(tight_linf)) <= 1.5, tight_linf
