"""A certified upper bound on the local Lipschitz constant over the input set:

    U ≥ sup { ‖J_Ψ(c + δ + K e) K‖₂ : ‖e‖_p ≤ ε, |δ| ≤ s },

the largest ℓ2 operator norm, from the perturbation space to the output, of the Jacobian of Ψ
anywhere on the set (for a ReLU network, of its Clarke generalised Jacobian: the convex hull of
the Jacobians of the pieces that meet the point). On a convex set, ‖Ψ(z) − Ψ(z')‖₂ ≤ U‖e − e'‖₂
for any two of its points z = c + K e, z' = c + K e'.
What the `lipschitz` check estimates from below, ‖J_Ψ(y)‖₂ at the clean input, is one of the
values this sup runs over.

How: interval arithmetic on the Jacobian, forward through the graph, its columns (one per
perturbation entry) in the batch dimension. The input's Jacobian is K, exactly. An affine step
maps an interval [lo, hi] of Jacobians to W·mid ± |W|·rad (W·mid as fn(mid) − fn(0), the step's
|linear part| for |W|·rad), widened by GAMMA·(2|W|(|mid| + rad) + |W·mid| + 2|b|), the IBP
margin plus the rounding of the bias b = fn(0) that the difference cancels. A ReLU or leaky
ReLU multiplies each row by its derivative d, known from the step's intermediate bounds [l, u]
(IBP's, or CROWN's with `intermediate="crown"`): d = 1 where l ≥ 0 (on the set the unit is the
identity), d = a (the negative slope) where u ≤ 0, and d ∈ [a, 1] otherwise; a product of an
interval by d ≥ 0 is exact in floating point for d ∈ {0, 1} and widened by 1e-15 relative
otherwise. Max pooling's derivative selects one entry of its window, any entry k whose upper
bound reaches the window's largest lower bound: the Jacobian of the output lies in the hull of
those entries' intervals (exactly the selected one when a single entry dominates). These are
Clarke's chain rule and his rule for a maximum, with every factor replaced by an interval that
contains it; Clarke's mean value theorem, Ψ(z) − Ψ(z') ∈ conv ∂Ψ([z', z])·(e − e'), then gives
the Lipschitz bound.

The figure, for the output's interval Jacobian [lo, hi] (rows: outputs, columns: perturbation
entries), is the smaller of

* ‖mid‖₂ + ‖R‖₂ with mid = (lo + hi)/2 and R = max(hi − mid, mid − lo) ≥ |J − mid| (a nonnegative
  matrix dominating |A| elementwise has ‖A‖₂ ≤ ‖|A|‖₂ ≤ its own norm), and
* ‖max(|lo|, |hi|)‖₂ (the same argument with |J| itself),

each norm from `spectral_norm_upper` (Gram eigenvalue plus its rounding allowance), the
subtractions' rounding covered by a relative 1e-12. Where every ReLU is stable over the set the
interval is a point up to the margins and U is σ_max(J K) itself; where units are unstable the
intervals of independent products lose their correlations, and U is looser than the largest
Jacobian over the set.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.bounds.figure import FINAL, U64, Certificate, spectral_norm_upper
from workers.engine.bounds.graph import Graph, Step, Unbounded, trace
from workers.engine.bounds.inputs import GAMMA, InputSet
from workers.engine.bounds.propagate import LEAKY_MARGIN, Bounds, Crown, _pair, ibp

Interval = tuple[torch.Tensor, torch.Tensor]  # [P, 1, *shape] each, P perturbation entries


def certify_lipschitz(
    model: nn.Module, inputs: InputSet, *, intermediate: str = "ibp", chunk: int = 64
) -> Certificate | Unbounded:
    """A certified upper bound on sup ‖J_Ψ K‖₂ over the input set (the module docstring), or
    `Unbounded` naming the first unsupported layer. `upper` is a Lipschitz constant (output
    change per unit ℓ2 norm of the perturbation), not a change."""
    try:
        _, graph = trace(model, inputs.input_shape)
    except Unbounded as exc:
        return exc
    started = time.perf_counter()
    with torch.no_grad():
        if intermediate == "ibp":
            bounds = ibp(graph, inputs)
        else:
            try:
                bounds = Crown(graph, inputs, intermediate=intermediate, chunk=chunk).bounds
            except Unbounded as exc:
                return exc
        try:
            lo, hi = interval_jacobian(graph, inputs, bounds)
        except Unbounded as exc:
            return exc
    n_out = lo[0].numel()
    lo = lo.reshape(lo.shape[0], n_out).T
    hi = hi.reshape(hi.shape[0], n_out).T
    mid = (lo + hi) / 2
    spread = torch.maximum(hi - mid, mid - lo)
    figures = {
        "interval_jacobian": (spectral_norm_upper(mid) + spectral_norm_upper(spread))
        * (1 + 4 * U64 + FINAL),
        "jacobian_magnitude": spectral_norm_upper(torch.maximum(lo.abs(), hi.abs())),
    }
    method = min(figures, key=lambda k: figures[k])
    return Certificate(
        upper=figures[method],
        method=method,
        figures=figures,
        radius=inputs.radius,
        norm=inputs.norm,
        seconds={"lipschitz": time.perf_counter() - started},
    )


def interval_jacobian(graph: Graph, inputs: InputSet, bounds: Bounds) -> Interval:
    """Elementwise bounds [lo, hi] of the Jacobian of the graph's output with respect to the
    perturbation e over the set, shaped [P, *output_shape] (P perturbation entries)."""
    remaining = Counter(name for step in graph.steps for name in step.inputs)
    remaining[graph.output] += 1
    values: dict[str, Interval] = {}
    for step in graph.steps:
        if step.kind == "input":
            start = _input_jacobian(inputs)
            values[step.name] = (start, start)
            continue
        ins = [values[name] for name in step.inputs]
        if step.kind == "linear":
            values[step.name] = _affine(step, ins, bounds)
        elif step.kind == "relu":
            values[step.name] = _relu(*ins[0], *bounds[step.inputs[0]], step.slope)
        else:
            values[step.name] = _maxpool(*ins[0], *bounds[step.inputs[0]], step)
        for name in step.inputs:  # free what no later step reads
            remaining[name] -= 1
            if remaining[name] == 0:
                del values[name]
    if graph.output not in values:  # as CROWN says of it
        raise Unbounded(f"step {graph.output!r} does not depend on the input")
    return values[graph.output]


def _input_jacobian(inputs: InputSet) -> torch.Tensor:
    """K as [P, *input_shape]: column j of K (∂z/∂e_j) in batch entry j."""
    shape = inputs.center.shape  # [1, ...]
    n = inputs.center.numel()
    if inputs.matrix is None:
        columns = torch.eye(n, dtype=torch.float64)
    elif inputs.matrix.dim() == 1:
        columns = torch.diag(inputs.matrix.to(torch.float64))
    else:
        columns = inputs.matrix.to(torch.float64).T
    return columns.reshape(-1, *shape)


def _affine(step: Step, ins: list[Interval], bounds: Bounds) -> Interval:
    """W·mid ± |W|·rad through the step's linear part, with the IBP margin. The linear part is
    fn(x) − fn(0) = fl(W x + b) − b, whose rounding is within n·u·(|W||x| + |b|) + u·|W x|: the
    margin GAMMA·(2|W|(|mid| + rad) + |W mid| + 2|b|) covers it."""
    assert step.fn is not None and step.absfn is not None
    fn, absfn = step.fn, step.absfn
    offset = fn(*(torch.zeros_like(bounds[name][0]) for name in step.inputs))  # b, exactly
    centres = [(lo + hi) / 2 for lo, hi in ins]
    radii = [(hi - lo) / 2 for lo, hi in ins]

    def linear_part(*columns: torch.Tensor) -> torch.Tensor:
        return fn(*columns) - offset

    mid = torch.func.vmap(linear_part)(*centres)
    rad = torch.func.vmap(absfn)(*radii)
    magnitude = torch.func.vmap(absfn)(*(c.abs() + r for c, r in zip(centres, radii, strict=True)))
    margin = GAMMA * (2 * magnitude + mid.abs() + 2 * offset.abs())
    return mid - rad - margin, mid + rad + margin


def _relu(
    lo: torch.Tensor, hi: torch.Tensor, z_lo: torch.Tensor, z_hi: torch.Tensor, slope: float
) -> Interval:
    """Rows times the derivative d ∈ [d_lo, d_hi] ⊂ [0, 1] (broadcast over the columns)."""
    one = torch.ones_like(z_lo)
    d_lo = torch.where(z_lo >= 0, one, one * slope)
    d_hi = torch.where(z_hi <= 0, one * slope, one)
    out_lo = torch.where(lo >= 0, d_lo * lo, d_hi * lo)
    out_hi = torch.where(hi >= 0, d_hi * hi, d_lo * hi)
    if slope not in (0.0, 1.0):
        out_lo = out_lo - LEAKY_MARGIN * out_lo.abs()
        out_hi = out_hi + LEAKY_MARGIN * out_hi.abs()
    return out_lo, out_hi


def _maxpool(
    lo: torch.Tensor, hi: torch.Tensor, z_lo: torch.Tensor, z_hi: torch.Tensor, step: Step
) -> Interval:
    """The hull of the Jacobian intervals of the window's entries that can be its maximum."""
    pool = step.pool
    if pool.get("ceil_mode"):
        raise Unbounded(f"Lipschitz: max pooling with ceil_mode ({step.label})")
    if z_lo.dim() != 4:
        raise Unbounded("Lipschitz: max pooling of a tensor that is not [N, C, H, W]")
    kernel = _pair(pool["kernel_size"])
    stride = _pair(pool.get("stride") or pool["kernel_size"])
    padding = _pair(pool.get("padding", 0))
    dilation = _pair(pool.get("dilation", 1))
    pad = (padding[1], padding[1], padding[0], padding[0])
    out_shape = F.max_pool2d(z_lo, kernel, stride, padding, dilation).shape  # [1, C, H', W']
    C = z_lo.shape[1]

    def windows(t: torch.Tensor, fill: float) -> torch.Tensor:  # [N, C, H, W] → [N, C, k, L]
        t = F.pad(t, pad, value=fill)
        w = F.unfold(t, kernel, dilation=dilation, stride=stride)
        return w.view(t.shape[0], C, kernel[0] * kernel[1], -1)

    lw, uw = windows(z_lo, float("-inf")), windows(z_hi, float("-inf"))
    candidate = uw >= lw.amax(dim=2, keepdim=True)  # [1, C, k, L]
    P = lo.shape[0]
    jl = windows(lo.reshape(P, *lo.shape[2:]), 0.0)
    jh = windows(hi.reshape(P, *hi.shape[2:]), 0.0)
    out_lo = jl.masked_fill(~candidate, float("inf")).amin(dim=2)
    out_hi = jh.masked_fill(~candidate, float("-inf")).amax(dim=2)
    return out_lo.view(P, *out_shape), out_hi.view(P, *out_shape)
