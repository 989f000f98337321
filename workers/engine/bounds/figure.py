"""The certified figure: U ≥ sup_{‖e‖_p ≤ ε} ‖Ψ(c + K e) − Ψ(c)‖ (ℓ2 of the change, or ℓ∞ with
`output="linf"`: the largest change of any one output coordinate).

From per-coordinate bounds l_i ≤ Δ_i ≤ u_i of the output change Δ (IBP's, CROWN's), the simple
bound is ‖max(|l|, |u|)‖₂. From CROWN's linear bounds aL_i·e + βL_i ≤ Ψ_i ≤ aU_i·e + βU_i, with
Ψ(c) ∈ [ψL, ψU] (an IBP of the centre alone, intersected with [βL, βU]: e = 0 is in the ball),
write Δ = M e + m + s with M = (aL + aU)/2,
m = (βL + βU − ψL − ψU)/2 and |s_i| ≤ ρ_i = ε‖(aU − aL)_i/2‖_q + (βU − βL + ψU − ψL)_i/2; then

    ‖Δ‖₂ ≤ ‖M e‖₂ + ‖ |m| + ρ ‖₂ ≤ ε·‖M‖_{p→2} + ‖ |m| + ρ ‖₂,

with ‖M‖_{2→2} = σ_max(M) bounded above by `spectral_norm_upper` (never by power iteration
alone) and ‖M‖_{∞→2} ≤ min(‖(‖M_i‖₁)_i‖₂, √n·σ_max(M)), or its exact value from the sign
vectors for a perturbation of at most 12 entries (`linf_to_l2_upper`). The tightest figure is
reported.

For the ℓ∞ norm of the change the figures are max_i max(|l_i|, |u_i|) (IBP's, CROWN's), raised
by 1e-12 relative for the rounding of the differences that made l and u. The linear form adds
nothing there: per coordinate, ε‖M_i‖_q + |m_i| + ρ_i is never below CROWN's own bounds.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.engine.bounds.graph import Unbounded, trace
from workers.engine.bounds.inputs import GAMMA, InputSet
from workers.engine.bounds.propagate import Crown, ibp

# float64 unit roundoff, and a generous multiple of it for the final sums and square roots
U64 = 2.0**-53
FINAL = 1e-12
# M is kept (for σ_max) up to this many entries; above, only its Frobenius / ℓ1 norms
MAX_DENSE_ENTRIES = 2**25
# exact σ_max (an eigenvalue of the smaller Gram matrix) up to this dimension
MAX_EIG_DIMENSION = 4096
# exact ‖M‖_{∞→2} by its sign vectors up to this many perturbation entries, and up to this many
# entries of M times the sign vectors
MAX_SIGN_DIMENSION = 12
MAX_SIGN_ENTRIES = 2**22


@dataclass
class Certificate:
    """`upper`: the tightest certified U; `figures`: every method's U (inf where it failed);
    `notes`: why a method gave nothing (e.g. CROWN on a layer it does not relax yet)."""

    upper: float
    method: str
    figures: dict[str, float]
    radius: float
    norm: str  # the ball's norm on the perturbation
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    output: str = "l2"  # the norm of the output change that U bounds


def certify_output_change(
    model: nn.Module,
    inputs: InputSet,
    *,
    methods: tuple[str, ...] = ("ibp", "crown"),
    intermediate: str = "ibp",
    chunk: int = 64,
    output: str = "l2",
) -> Certificate | Unbounded:
    """A certified upper bound on the worst output change over the input set, or `Unbounded`
    naming why there is none (the first unsupported layer, a model torch.fx cannot trace).
    `output`: the norm of the change, "l2" (what the checks measure) or "linf"."""
    if output not in ("l2", "linf"):
        raise ValueError(f"output norm 'l2' or 'linf', not {output!r}")
    try:
        _, graph = trace(model, inputs.input_shape)
    except Unbounded as exc:
        return exc
    figures: dict[str, float] = {}
    seconds: dict[str, float] = {}
    notes: list[str] = []
    centre_only = InputSet(inputs.center, 0.0, inputs.norm, None, inputs.slack)
    with torch.no_grad():
        psi_lo, psi_hi = (t.reshape(-1) for t in ibp(graph, centre_only)[graph.output])
    if "ibp" in methods:
        started = time.perf_counter()
        lo, hi = (t.reshape(-1) for t in ibp(graph, inputs)[graph.output])
        figures["ibp"] = _per_coordinate(lo - psi_hi, hi - psi_lo, output)
        seconds["ibp"] = time.perf_counter() - started
    if "crown" in methods:
        started = time.perf_counter()
        try:
            crown_figures = _crown(graph, inputs, psi_lo, psi_hi, intermediate, chunk, output)
            figures.update(crown_figures)
        except Unbounded as exc:
            notes.append(exc.reason)
        seconds["crown"] = time.perf_counter() - started
    if not figures:
        return Unbounded("; ".join(notes) or "no method ran")
    method = min(figures, key=lambda k: figures[k])
    return Certificate(
        upper=figures[method],
        method=method,
        figures=figures,
        radius=inputs.radius,
        norm=inputs.norm,
        seconds=seconds,
        notes=notes,
        output=output,
    )


def _per_coordinate(lower: torch.Tensor, upper: torch.Tensor, output: str = "l2") -> float:
    worst = torch.maximum(lower.abs(), upper.abs())
    if output == "linf":
        # the maximum is exact; the differences l, u were rounded (by u relative at most)
        return float(worst.max()) * (1 + 2 * U64 + FINAL)
    return _norm_up(worst)


def _norm_up(v: torch.Tensor) -> float:
    """‖v‖₂ rounded up: a sum of n squares is off by at most n·u relative."""
    n = v.numel()
    value = float(torch.linalg.vector_norm(v.to(torch.float64)))
    return value * (1 + (n + 4) * U64 + FINAL)


def _crown(
    graph,
    inputs: InputSet,
    psi_lo: torch.Tensor,
    psi_hi: torch.Tensor,
    intermediate: str,
    chunk: int,
    output: str = "l2",
) -> dict[str, float]:
    crown = Crown(graph, inputs, intermediate=intermediate, chunk=chunk)
    n_out = psi_lo.numel()
    n_e = inputs.perturbation_size
    keep = n_out * n_e <= MAX_DENSE_ENTRIES
    mids: list[torch.Tensor] = []
    lows, highs, offsets, halves = [], [], [], []
    frobenius2 = 0.0
    row_l1: list[torch.Tensor] = []
    for start in range(0, n_out, chunk):
        rows = torch.arange(start, min(n_out, start + chunk))
        lin = crown.linear(graph.output, rows)
        lo, hi = lin.concretise(inputs)
        # e = 0 is in the ball: the linear bounds there bound Ψ(c) too, far tighter than an
        # interval pass on a deep network (whose margins grow with |W| layer after layer)
        c_lo = torch.maximum(psi_lo[rows], lin.lower_bias)
        c_hi = torch.minimum(psi_hi[rows], lin.upper_bias)
        lows.append(lo - c_hi)
        highs.append(hi - c_lo)
        mid = (lin.lower + lin.upper) / 2
        half = (lin.upper - lin.lower) / 2
        rho = inputs.radius * torch.linalg.vector_norm(half, ord=inputs.dual, dim=1)
        rho = rho + (lin.upper_bias - lin.lower_bias + c_hi - c_lo) / 2
        m = (lin.upper_bias + lin.lower_bias - c_lo - c_hi) / 2
        offsets.append(m.abs())
        halves.append(rho)
        frobenius2 += float((mid * mid).sum())
        row_l1.append(mid.abs().sum(dim=1))
        if keep:
            mids.append(mid)
    figures = {"crown": _per_coordinate(torch.cat(lows), torch.cat(highs), output)}
    if output == "linf":
        return figures
    frobenius = math.sqrt(frobenius2) * (1 + (n_out * n_e + 4) * U64 + FINAL)
    sigma = frobenius
    if keep:
        sigma = min(sigma, spectral_norm_upper(torch.cat(mids)))
    if inputs.norm == "l2":
        gain = sigma
    else:
        l1 = _norm_up(torch.cat(row_l1)) * (1 + n_e * U64)
        gain = min(l1, math.sqrt(n_e) * sigma * (1 + FINAL))
        if keep and n_e <= MAX_SIGN_DIMENSION and n_out * 2 ** (n_e - 1) <= MAX_SIGN_ENTRIES:
            gain = min(gain, linf_to_l2_upper(torch.cat(mids), l1))
    rest = _norm_up(torch.cat(offsets) + torch.cat(halves))
    figures["crown_linear"] = (inputs.radius * gain + rest) * (1 + FINAL)
    return figures


def linf_to_l2_upper(M: torch.Tensor, row_l1: float) -> float:
    """‖M‖_{∞→2} = max over sign vectors s of ‖M s‖₂ (a convex function of e peaks at a vertex
    of the cube; s and −s give the same value, so the first sign is fixed), rounding included:
    |fl(M s) − M s| ≤ n·u·|M|·1 elementwise, so ‖M s‖₂ ≤ ‖fl(M s)‖₂ + GAMMA·‖(‖M_i‖₁)_i‖₂
    (`row_l1`, itself an upper bound), and the norm is rounded up. For few columns only."""
    M = M.to(torch.float64)
    rows, cols = M.shape
    signs = torch.tensor(
        [[1.0, *bits] for bits in itertools.product([1.0, -1.0], repeat=cols - 1)],
        dtype=torch.float64,
    )  # [2^(cols−1), cols]
    best = float(torch.linalg.vector_norm(M @ signs.T, dim=0).max())
    best = best * (1 + (rows + 4) * U64 + FINAL)
    return (best + GAMMA * row_l1) * (1 + FINAL)


def spectral_norm_upper(M: torch.Tensor) -> float:
    """An upper bound on σ_max(M), float64 rounding included.

    The largest eigenvalue λ̂ of the smaller Gram matrix G = M Mᵀ (or MᵀM) from a symmetric
    eigensolver: fl(G) is within k·u·‖M‖_F² of G (k the inner dimension) and the solver is
    backward stable, its eigenvalues within p(n)·u·‖fl(G)‖₂ of fl(G)'s (p(n) = 10 n taken, well
    above LAPACK's bounds for the dimensions allowed); so σ_max² ≤ λ̂ + (k + 10 n + 10)·u·‖M‖_F²
    ·(1 + 1e-12). Never above ‖M‖_F (always valid) nor √(‖M‖₁‖M‖_∞)."""
    M = M.to(torch.float64)
    rows, cols = M.shape
    frob2 = float((M * M).sum()) * (1 + (rows * cols + 4) * U64)
    bound = math.sqrt(frob2)
    norm1 = float(M.abs().sum(dim=0).max()) * (1 + (rows + 4) * U64)
    norm_inf = float(M.abs().sum(dim=1).max()) * (1 + (cols + 4) * U64)
    bound = min(bound, math.sqrt(norm1 * norm_inf))
    n = min(rows, cols)
    if 0 < n <= MAX_EIG_DIMENSION:
        gram = M @ M.T if rows <= cols else M.T @ M
        k = max(rows, cols)
        top = float(torch.linalg.eigvalsh(gram)[-1])
        slack = (k + 10 * n + 10) * U64 * frob2 * (1 + FINAL)
        bound = min(bound, math.sqrt(max(top, 0.0) + slack))
    return bound * (1 + FINAL)
