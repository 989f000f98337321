"""Exact worst output changes of small ReLU networks over an ℓ∞ ball (a box), two ways.

The network is f(x) = W_L relu(… relu(W_1 x + b_1) …) + b_L on the box lo ≤ x ≤ hi, and the
figure is max ‖f(x) − f(x0)‖ over the box, for the ℓ2 and the ℓ∞ norm of the change.

* `vertex_maximum` (exact for both norms, tiny networks): the box is cut into finitely many
  polytopes on which the activation pattern is constant, so f is affine and x ↦ ‖f(x) − f(x0)‖
  is convex there; a convex function on a polytope attains its maximum at a vertex. A vertex of
  such a polytope is a point of it where d linearly independent constraints are active, among
  the box's faces and the neurons' switching hyperplanes {z_k(x) = 0}. Given the activation
  pattern of the layers before the last hidden one, every pre-activation of every hidden layer
  is affine in x, so those hyperplanes are known: for each such pattern the helper solves every
  d × d system made of d of them (skipping singular and nearly singular ones: |det| below 1e-12
  of the product of the rows' norms) and keeps the solution (clipped to the box). Every vertex
  of every region is among these points, so the largest change at them, evaluated by the
  network itself, is the maximum. Points that are no vertex of anything are still points of
  the box: they can only lower the maximum, never raise it. Cost: the number of
  patterns of all hidden layers but the last, times C(2d + N, d) (N the hidden neurons), so for
  a few inputs and at most a dozen neurons.
* `milp_extremes` (ℓ∞ of the change, exact up to HiGHS's tolerances, any small network):
  max and min of each coordinate f_i(x) − f_i(x0) over the box by a mixed-integer linear
  program (scipy.optimize.milp, HiGHS): each unstable ReLU h = relu(z), with interval bounds
  l < 0 < u on z, is encoded exactly by a binary δ and h ≥ 0, h ≥ z, h ≤ u δ,
  h ≤ z − l (1 − δ); stable ones are h = z or h = 0. The bounds come from this module's own
  interval arithmetic (float64, widened outward), not from the engine under test. HiGHS solves
  to a relative gap of 1e-9 with feasibility tolerances of about 1e-7, so the optimum it reports
  can exceed the true one by about that much times the bounds; the returned `achieved` is the
  network's own value at the solver's point, a value of the true function.
* `exact_lipschitz`: the local Lipschitz constant over the box, the largest σ_max of the
  Jacobian over the activation patterns whose regions meet the box with interior (one linear
  program per pattern).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import LinearConstraint, milp
from torch import nn

Layers = list[tuple[np.ndarray, np.ndarray]]  # (W, b) per affine layer, ReLU between them


def random_network(
    generator: np.random.Generator,
    n_in: int,
    widths: tuple[int, ...],
    n_out: int,
    bias: float = 0.5,
) -> nn.Sequential:
    """Linear → ReLU → … → Linear, float64, weights ~ N(0, 2/fan-in), biases ~ N(0, bias²)."""
    sizes = (n_in, *widths, n_out)
    modules: list[nn.Module] = []
    for k, (a, b) in enumerate(itertools.pairwise(sizes)):
        layer = nn.Linear(a, b).double()
        layer.weight.data = torch.from_numpy(generator.normal(size=(b, a)) * math.sqrt(2 / a))
        layer.bias.data = torch.from_numpy(bias * generator.normal(size=b))
        modules.append(layer)
        if k < len(sizes) - 2:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules).eval()


def layers_of(model: nn.Sequential, into: np.ndarray | None = None) -> Layers:
    """The (W, b) of a Linear/ReLU Sequential, float64; `into` (a matrix K) is composed into the
    first layer, for a network that reads K x."""
    layers = [
        (m.weight.detach().double().numpy().copy(), m.bias.detach().double().numpy().copy())
        for m in model
        if isinstance(m, nn.Linear)
    ]
    if into is not None:
        w, b = layers[0]
        layers[0] = (w @ into, b)
    return layers


def evaluate(layers: Layers, x: np.ndarray) -> np.ndarray:
    """f at the rows of x ([B, d] → [B, m])."""
    h = x
    for k, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if k < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def interval_bounds(
    layers: Layers, lo: np.ndarray, hi: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Bounds on every hidden pre-activation over the box, widened outward well beyond float64's
    rounding (loose bounds only weaken the MILP's relaxation, never its answer)."""
    out = []
    low, high = lo, hi
    for w, b in layers[:-1]:
        c, r = (low + high) / 2, (high - low) / 2
        mid, rad = w @ c + b, np.abs(w) @ r
        margin = 1e-9 * (np.abs(w) @ (np.abs(c) + r) + np.abs(b) + 1.0)
        zl, zu = mid - rad - margin, mid + rad + margin
        out.append((zl, zu))
        low, high = np.maximum(zl, 0.0), np.maximum(zu, 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# vertex enumeration


@dataclass
class VertexMaximum:
    l2: float  # max ‖f(x) − f(x0)‖₂ over the box
    linf: float  # max ‖f(x) − f(x0)‖_∞
    l2_point: np.ndarray  # a maximiser of each
    linf_point: np.ndarray
    candidates: int  # points evaluated


def _affine_pieces(layers: Layers, pattern: list[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
    """Given the activation pattern of the first hidden layers (a 0/1 vector each), every hidden
    pre-activation in the next layer as an affine map of x: (A, a) with z = A x + a."""
    d = layers[0][0].shape[1]
    A, a = np.eye(d), np.zeros(d)
    pieces = []
    for k in range(len(pattern) + 1):
        w, b = layers[k]
        A, a = w @ A, w @ a + b
        pieces.append((A, a))
        if k < len(pattern):
            A, a = pattern[k][:, None] * A, pattern[k] * a
    return pieces


def vertex_maximum(
    layers: Layers, x0: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_candidates: int = 400_000
) -> VertexMaximum:
    """max over the box of ‖f(x) − f(x0)‖ (ℓ2 and ℓ∞) by enumerating the vertices of the
    regions of linearity (module docstring)."""
    d = x0.size
    hidden = [w.shape[0] for w, _ in layers[:-1]]
    early = hidden[:-1]
    n_patterns = 2 ** sum(early)
    n_planes = 2 * d + sum(hidden)
    subsets = np.array(list(itertools.combinations(range(n_planes), d)))
    if n_patterns * len(subsets) > max_candidates:
        raise ValueError(f"{n_patterns} × {len(subsets)} systems: too many for enumeration")
    box_normals = np.concatenate([np.eye(d), np.eye(d)])
    box_offsets = np.concatenate([-lo, -hi])  # x_i − lo_i = 0, x_i − hi_i = 0
    points = [lo[None], hi[None], x0[None]]
    for bits in itertools.product([0.0, 1.0], repeat=sum(early)):
        split = np.split(np.array(bits), np.cumsum(early)[:-1]) if early else []
        pieces = _affine_pieces(layers, list(split))
        normals = np.concatenate([box_normals, *(A for A, _ in pieces)])
        offsets = np.concatenate([box_offsets, *(a for _, a in pieces)])
        M = normals[subsets]  # [S, d, d]: rows · x + offset = 0
        rhs = -offsets[subsets]
        scale = np.prod(np.linalg.norm(M, axis=2), axis=1)
        det = np.linalg.det(M)
        regular = np.abs(det) > 1e-12 * np.maximum(scale, 1e-300)
        if not regular.any():
            continue
        x = np.linalg.solve(M[regular], rhs[regular][..., None])[..., 0]
        inside = np.all((x >= lo - 1e-9) & (x <= hi + 1e-9), axis=1)
        points.append(np.clip(x[inside], lo, hi))
    candidates = np.concatenate(points)
    change = evaluate(layers, candidates) - evaluate(layers, x0[None])
    l2 = np.linalg.norm(change, axis=1)
    linf = np.abs(change).max(axis=1)
    i2, ii = int(l2.argmax()), int(linf.argmax())
    return VertexMaximum(
        float(l2[i2]), float(linf[ii]), candidates[i2], candidates[ii], len(candidates)
    )


# ---------------------------------------------------------------------------------------------
# mixed-integer linear programming


@dataclass
class Extreme:
    value: float  # the MILP's optimum of s·(f_i(x) − f_i(x0))
    dual: float  # its dual bound (≥ the true optimum, up to HiGHS's tolerances)
    achieved: float  # the network's own s·(f_i(x*) − f_i(x0)) at the solver's point x*
    point: np.ndarray


def milp_extremes(
    layers: Layers, x0: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> list[tuple[Extreme, Extreme]]:
    """Per output coordinate i: (the maximum, the maximum of the negation) of f_i(x) − f_i(x0)
    over the box, each by one MILP (module docstring)."""
    bounds = interval_bounds(layers, lo, hi)
    base = evaluate(layers, x0[None])[0]
    problem = _Encoding(layers, bounds, lo, hi)
    w_out, b_out = layers[-1]
    results = []
    for i in range(w_out.shape[0]):
        pair = []
        for sign in (1.0, -1.0):
            objective = np.zeros(problem.size)
            objective[problem.last] = -sign * w_out[i]  # milp minimises
            result = milp(
                objective,
                integrality=problem.integrality,
                bounds=(problem.lower, problem.upper),
                constraints=problem.constraints,
                options={"mip_rel_gap": 1e-9, "presolve": True},
            )
            if not result.success:
                raise RuntimeError(f"HiGHS: {result.message}")
            constant = sign * (b_out[i] - base[i])
            x = np.clip(result.x[: x0.size], lo, hi)
            achieved = sign * (evaluate(layers, x[None])[0, i] - base[i])
            dual = result.mip_dual_bound if result.mip_dual_bound is not None else result.fun
            pair.append(Extreme(-result.fun + constant, -dual + constant, float(achieved), x))
        results.append((pair[0], pair[1]))
    return results


class _Encoding:
    """Variables [x, h_1, δ_1, h_2, δ_2, …] and the big-M constraints of every hidden layer."""

    def __init__(self, layers: Layers, bounds: list, lo: np.ndarray, hi: np.ndarray) -> None:
        d = lo.size
        lower, upper, integrality = list(lo), list(hi), [0] * d
        rows: list[tuple[dict[int, float], float, float]] = []  # ({var: coeff}, lb, ub)
        previous = list(range(d))
        for (w, b), (zl, zu) in zip(layers[:-1], bounds, strict=True):
            n = w.shape[0]
            h0 = len(lower)
            lower += list(np.maximum(zl, 0.0))
            upper += list(np.maximum(zu, 0.0))
            integrality += [0] * n
            hs = list(range(h0, h0 + n))
            for k in range(n):
                z = {j: float(w[k, t]) for t, j in enumerate(previous)}  # z = Σ z[j] v_j + b
                low, up = float(zl[k]), float(zu[k])
                h = hs[k]
                if low >= 0:  # h = z
                    rows.append(({**_neg(z), h: 1.0}, float(b[k]), float(b[k])))
                elif up <= 0:  # h = 0: its bounds are [0, 0] already
                    continue
                else:
                    delta = len(lower)
                    lower.append(0.0)
                    upper.append(1.0)
                    integrality.append(1)
                    # h ≥ z:  h − z ≥ b
                    rows.append(({**_neg(z), h: 1.0}, float(b[k]), np.inf))
                    # h ≤ z − l(1 − δ):  h − z − l δ ≤ b − l
                    rows.append(({**_neg(z), h: 1.0, delta: -low}, -np.inf, float(b[k]) - low))
                    # h ≤ u δ
                    rows.append(({h: 1.0, delta: -up}, -np.inf, 0.0))
            previous = hs
        self.size = len(lower)
        self.last = np.array(previous)
        self.lower, self.upper = np.array(lower), np.array(upper)
        self.integrality = np.array(integrality)
        matrix = np.zeros((len(rows), self.size))
        lb, ub = np.empty(len(rows)), np.empty(len(rows))
        for r, (coefficients, a, c) in enumerate(rows):
            for j, value in coefficients.items():
                matrix[r, j] = value
            lb[r], ub[r] = a, c
        self.constraints = LinearConstraint(matrix, lb, ub)


def _neg(z: dict[int, float]) -> dict[int, float]:
    return {j: -v for j, v in z.items()}


# ---------------------------------------------------------------------------------------------
# the local Lipschitz constant


def reachable_patterns(layers: Layers, lo: np.ndarray, hi: np.ndarray) -> list[list[np.ndarray]]:
    """Every activation pattern (all hidden layers) whose region meets the box in a set with
    interior, by one LP per candidate pattern: maximise t subject to σ_k z_k(x) ≥ t for every
    neuron (σ = ±1 by the pattern) inside the box; the pattern is reachable iff t* > 0. Neurons
    that interval bounds prove stable on the box keep their one sign (the candidates are the
    patterns of the others)."""
    from scipy.optimize import linprog

    hidden = [w.shape[0] for w, _ in layers[:-1]]
    d = lo.size
    fixed = np.concatenate(
        [
            np.where(zl >= 0, 1.0, np.where(zu <= 0, 0.0, np.nan))
            for zl, zu in interval_bounds(layers, lo, hi)
        ]
    )
    free = np.flatnonzero(np.isnan(fixed))
    reachable = []
    for bits in itertools.product([0.0, 1.0], repeat=len(free)):
        flat = fixed.copy()
        flat[free] = bits
        split = list(np.split(flat, np.cumsum(hidden)[:-1]))
        pieces = _affine_pieces(layers, split[:-1])
        A = np.concatenate([p[0] for p in pieces])
        a = np.concatenate([p[1] for p in pieces])
        sigma = 2 * flat - 1
        # σ (A x + a) ≥ t  ⇔  −σ A x + t ≤ σ a ;  variables [x, t], maximise t
        matrix = np.hstack([-sigma[:, None] * A, np.ones((len(a), 1))])
        result = linprog(
            np.r_[np.zeros(d), -1.0],
            A_ub=matrix,
            b_ub=sigma * a,
            bounds=[*zip(lo, hi, strict=True), (None, 1.0)],
            method="highs",
        )
        if result.status == 0 and -result.fun > 1e-9:
            reachable.append(split)
    return reachable


def jacobian_of(layers: Layers, pattern: list[np.ndarray]) -> np.ndarray:
    """W_L D_{L−1} W_{L−1} … D_1 W_1 for a pattern of every hidden layer."""
    J = layers[0][0]
    for D, (w, _) in zip(pattern, layers[1:], strict=True):
        J = w @ (D[:, None] * J)
    return J


def exact_lipschitz(layers: Layers, lo: np.ndarray, hi: np.ndarray) -> float:
    """The ℓ2 Lipschitz constant of f on the box: the largest σ_max of the Jacobian over the
    regions of linearity with interior in the box (on a convex set a continuous piecewise-affine
    map is Lipschitz with the largest of its pieces' norms, and attains each piece's ratio
    along a short segment inside that piece)."""
    return max(
        float(np.linalg.norm(jacobian_of(layers, p), 2)) for p in reachable_patterns(layers, lo, hi)
    )
