"""Interval bound propagation (IBP) and CROWN-style backward linear relaxation, in float64.

Both walk the steps of `graph.Graph`. Soundness under rounding comes from outward margins
(docs/theorem.md, "Certified upper bounds"):

* IBP: an affine step maps the centre c and radius r of its input box to W c + b ± |W| r. Both
  products are float64 sums of at most n terms, wrong by at most n·u·|W|(|c| + r) (+ the bias's
  rounding, under |mid| + |W||c|), u = 2⁻⁵³; every bound is widened by
  GAMMA·(2|W|(|c| + r) + |W c + b|) with GAMMA = 1e-10 ≥ n·u for n up to 9·10⁵ terms per sum.
  ReLU and max pooling are exact in floating point; leaky ReLU's product is widened by 1e-15
  relative.
* CROWN: the coefficients travel backwards through the transposed linear maps (autograd's vjp of
  each affine step, in float64); the relaxation intercepts of unstable ReLUs are widened by
  1e-12·(|l| + |u|), and every concretised bound by GAMMA_STEP × (number of steps + 1) × the
  magnitude of the sums that made it (Σ|A||c|, the slack, ε‖A K‖_q and Σ|A||bias| tracked along
  the pass), an allowance several orders of magnitude above float64's accumulated rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from workers.engine.bounds.graph import Graph, Step, Unbounded
from workers.engine.bounds.inputs import GAMMA, InputSet

GAMMA_STEP = 1e-10
RELU_MARGIN = 1e-12
LEAKY_MARGIN = 1e-15
Bounds = dict[str, tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# IBP


def ibp(graph: Graph, inputs: InputSet) -> Bounds:
    """Elementwise lower and upper bounds of every step's value over the input set."""
    bounds: Bounds = {}
    with torch.no_grad():
        for step in graph.steps:
            if step.kind == "input":
                bounds[step.name] = inputs.box()
                continue
            ins = [bounds[name] for name in step.inputs]
            if step.kind == "relu":
                bounds[step.name] = _relu_interval(*ins[0], step.slope)
            elif step.kind == "maxpool":
                lo, hi = ins[0]
                bounds[step.name] = (
                    F.max_pool2d(lo, **step.pool),
                    F.max_pool2d(hi, **step.pool),
                )
            else:
                bounds[step.name] = _affine_interval(step, ins)
    return bounds


def _affine_interval(
    step: Step, ins: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    assert step.fn is not None and step.absfn is not None
    centres = [(lo + hi) / 2 for lo, hi in ins]
    radii = [(hi - lo) / 2 for lo, hi in ins]
    mid = step.fn(*centres)
    rad = step.absfn(*radii)
    magnitude = step.absfn(*(c.abs() + r for c, r in zip(centres, radii, strict=True)))
    margin = GAMMA * (2 * magnitude + mid.abs())
    return mid - rad - margin, mid + rad + margin


def _relu_interval(
    lo: torch.Tensor, hi: torch.Tensor, slope: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if slope == 0.0:
        return lo.clamp_min(0), hi.clamp_min(0)
    out_lo, out_hi = _leaky(lo, slope), _leaky(hi, slope)
    return out_lo - LEAKY_MARGIN * out_lo.abs(), out_hi + LEAKY_MARGIN * out_hi.abs()


def _leaky(x: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.where(x >= 0, x, x * slope)


# ---------------------------------------------------------------------------------------------
# CROWN


@dataclass
class LinearBounds:
    """For each of S rows: lower·e + lower_bias ≤ value ≤ upper·e + upper_bias over the set
    (margins included in the biases); `lower`, `upper` are [S, n_perturbation]."""

    lower: torch.Tensor
    lower_bias: torch.Tensor
    upper: torch.Tensor
    upper_bias: torch.Tensor

    def concretise(self, inputs: InputSet) -> tuple[torch.Tensor, torch.Tensor]:
        q, eps = inputs.dual, inputs.radius
        lo = self.lower_bias - eps * torch.linalg.vector_norm(self.lower, ord=q, dim=1)
        hi = self.upper_bias + eps * torch.linalg.vector_norm(self.upper, ord=q, dim=1)
        scale = 1 + GAMMA
        return lo - (scale - 1) * lo.abs(), hi + (scale - 1) * hi.abs()


class Crown:
    """CROWN on a graph: intermediate bounds (IBP, optionally refined by CROWN itself), then
    linear bounds of any step's value in e."""

    def __init__(
        self, graph: Graph, inputs: InputSet, intermediate: str = "ibp", chunk: int = 64
    ) -> None:
        for step in graph.steps:
            if step.kind == "maxpool" and step.pool.get("ceil_mode"):
                raise Unbounded(f"CROWN: max pooling with ceil_mode ({step.label})")
        self.graph = graph
        self.inputs = inputs
        self.chunk = chunk
        self.index = {step.name: k for k, step in enumerate(graph.steps)}
        self.bounds = ibp(graph, inputs)
        self._vjps: dict[str, tuple[torch.Tensor, Callable]] = {}
        self._relaxations: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], ...]] = {}
        if intermediate == "crown":
            for step in graph.steps:
                if step.kind in ("relu", "maxpool"):
                    self._refine(step.inputs[0])
        elif intermediate != "ibp":
            raise ValueError(f"intermediate bounds from 'ibp' or 'crown', not {intermediate!r}")

    def _refine(self, name: str) -> None:
        lo, hi = self.bounds[name]
        if self.graph.steps[self.index[name]].kind == "input":
            return
        n = lo.numel()
        new_lo, new_hi = [], []
        for start in range(0, n, self.chunk):
            rows = torch.arange(start, min(n, start + self.chunk))
            lin = self.linear(name, rows)
            a, b = lin.concretise(self.inputs)
            new_lo.append(a)
            new_hi.append(b)
        crown_lo = torch.cat(new_lo).view_as(lo)
        crown_hi = torch.cat(new_hi).view_as(hi)
        self.bounds[name] = (torch.maximum(lo, crown_lo), torch.minimum(hi, crown_hi))

    def linear(self, name: str, rows: torch.Tensor) -> LinearBounds:
        """Linear bounds in e of the flattened entries `rows` of step `name`'s value."""
        steps = self.graph.steps[: self.index[name] + 1]
        shape = self.bounds[name][0].shape
        S = len(rows)
        start = torch.zeros(S, shape.numel(), dtype=torch.float64)
        start[torch.arange(S), rows] = 1.0
        start = start.view(S, *shape)
        upper: dict[str, torch.Tensor] = {name: start}
        lower: dict[str, torch.Tensor] = {name: start.clone()}
        bias_u = torch.zeros(S, dtype=torch.float64)
        bias_l = torch.zeros(S, dtype=torch.float64)
        magnitude = torch.zeros(S, dtype=torch.float64)  # Σ|A||terms|, for the margin
        at_input: tuple[torch.Tensor, torch.Tensor] | None = None
        with torch.no_grad():
            for step in reversed(steps):
                if step.name not in upper:
                    continue
                au, al = upper.pop(step.name), lower.pop(step.name)
                if step.kind == "input":
                    at_input = (al, au)
                    continue
                if step.kind == "linear":
                    # both passes at once: the same transposed map
                    grads, b, size = self._linear_back(step, torch.cat([au, al]))
                    outs_u = [g[:S] for g in grads]
                    outs_l = [g[S:] for g in grads]
                    bias_u += b[:S]
                    bias_l += b[S:]
                    magnitude += torch.maximum(size[:S], size[S:])
                elif step.kind == "relu":
                    (ku, cu), (kl, cl) = self._relaxation(step)
                    outs_u = [_mix(au, ku, kl)]
                    outs_l = [_mix(al, kl, ku)]
                    bias_u += _dot(au.clamp_min(0), cu) + _dot(au.clamp_max(0), cl)
                    bias_l += _dot(al.clamp_min(0), cl) + _dot(al.clamp_max(0), cu)
                    size_c = cu.abs() + cl.abs()
                    magnitude += torch.maximum(_dot(au.abs(), size_c), _dot(al.abs(), size_c))
                else:  # maxpool
                    lo, hi = self.bounds[step.inputs[0]]
                    out_u, b_u, out_l, b_l = _maxpool_back(au, al, lo, hi, step.pool)
                    outs_u, outs_l = [out_u], [out_l]
                    bias_u += b_u
                    bias_l += b_l
                    magnitude += torch.maximum(b_u.abs(), b_l.abs())
                for source, gu, gl in zip(step.inputs, outs_u, outs_l, strict=True):
                    if source in upper:
                        upper[source] = upper[source] + gu
                        lower[source] = lower[source] + gl
                    else:
                        upper[source], lower[source] = gu, gl
        if at_input is None:  # the value does not depend on the input: a constant
            raise Unbounded(f"step {name!r} does not depend on the input")
        al, au = (a.reshape(S, -1) for a in at_input)
        return self._concretisable(al, bias_l, au, bias_u, magnitude, len(steps))

    def _concretisable(
        self,
        al: torch.Tensor,
        bias_l: torch.Tensor,
        au: torch.Tensor,
        bias_u: torch.Tensor,
        magnitude: torch.Tensor,
        depth: int,
    ) -> LinearBounds:
        inputs = self.inputs
        c = inputs.center.reshape(-1)
        s = None if inputs.slack is None else inputs.slack.reshape(-1)
        lower_e, upper_e = inputs.through(al), inputs.through(au)
        lower_bias = al @ c + bias_l
        upper_bias = au @ c + bias_u
        size = magnitude + torch.maximum(al.abs() @ c.abs(), au.abs() @ c.abs())
        size = size + inputs.radius * torch.maximum(
            torch.linalg.vector_norm(lower_e, ord=inputs.dual, dim=1),
            torch.linalg.vector_norm(upper_e, ord=inputs.dual, dim=1),
        )
        if s is not None:
            lower_bias = lower_bias - al.abs() @ s
            upper_bias = upper_bias + au.abs() @ s
            size = size + torch.maximum(al.abs() @ s, au.abs() @ s)
        margin = GAMMA_STEP * (depth + 1) * (size + bias_u.abs() + bias_l.abs())
        return LinearBounds(lower_e, lower_bias - margin, upper_e, upper_bias + margin)

    def _relaxation(self, step: Step) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        if step.name not in self._relaxations:
            lo, hi = self.bounds[step.inputs[0]]
            self._relaxations[step.name] = _relu_relaxation(lo, hi, step.slope)
        return self._relaxations[step.name]

    def _linear_back(
        self, step: Step, a: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Aᵀ through an affine step: the coefficients on its inputs, Σ A·bias and Σ |A||bias|
        (for the margin)."""
        if step.name not in self._vjps:
            zeros = [torch.zeros_like(self.bounds[name][0]) for name in step.inputs]
            assert step.fn is not None
            result: Any = torch.func.vjp(step.fn, *zeros)
            self._vjps[step.name] = (result[0].detach(), result[1])
        out0, vjp = self._vjps[step.name]
        grads = torch.func.vmap(vjp)(a)
        bias = out0.expand_as(a[0])
        return list(grads), _dot(a, bias), _dot(a.abs(), bias.abs())


def _dot(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ over everything but the first dim of a × t (t broadcast over the rows)."""
    return (a * t).reshape(a.shape[0], -1).sum(dim=1)


def _mix(a: torch.Tensor, k_pos: torch.Tensor, k_neg: torch.Tensor) -> torch.Tensor:
    """A's positive entries times k_pos, its negative entries times k_neg."""
    return a.clamp_min(0) * k_pos + a.clamp_max(0) * k_neg


def _relu_relaxation(
    lo: torch.Tensor, hi: torch.Tensor, slope: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(slope, intercept) of an upper and a lower line of f(z) = max(z, a z) on [lo, hi]."""
    active, inactive = lo >= 0, hi <= 0
    unstable = ~(active | inactive)
    one = torch.ones_like(lo)
    k_stable = torch.where(active, one, one * slope)
    width = (hi - lo).where(unstable, one)
    k_up = ((hi - slope * lo) / width).where(unstable, k_stable)
    c_up = (slope * lo - k_up * lo + RELU_MARGIN * (lo.abs() + hi.abs())).where(
        unstable, torch.zeros_like(lo)
    )
    # the lower line: z or a·z (both below f everywhere), whichever is closer on [lo, hi]
    k_low = torch.where(hi >= -lo, one, one * slope).where(unstable, k_stable)
    return (k_up, c_up), (k_low, torch.zeros_like(lo))


def _maxpool_back(
    au: torch.Tensor, al: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, pool: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max pooling: below by the window's entry j with the largest lower bound; above by z_j
    when j dominates its window (l_j ≥ u_k for every other k), else by the window's max upper
    bound, a constant."""
    if lo.dim() != 4:
        raise Unbounded("CROWN: max pooling of a tensor that is not [N, C, H, W]")
    kernel = _pair(pool["kernel_size"])
    stride = _pair(pool.get("stride") or pool["kernel_size"])
    padding = _pair(pool.get("padding", 0))
    dilation = _pair(pool.get("dilation", 1))
    pad = (padding[1], padding[1], padding[0], padding[0])

    def windows(t: torch.Tensor, fill: float) -> torch.Tensor:
        t = F.pad(t, pad, value=fill)
        w = F.unfold(t, kernel, dilation=dilation, stride=stride)  # [1, C·k, L]
        return w.view(t.shape[1], kernel[0] * kernel[1], -1)  # [C, k, L]

    C = lo.shape[1]
    lw, uw = windows(lo, float("-inf")), windows(hi, float("-inf"))
    index = torch.arange(lo.numel(), dtype=torch.float64).view_as(lo)
    iw = windows(index, -1.0)
    j = lw.argmax(dim=1, keepdim=True)  # [C, 1, L]
    l_j = lw.gather(1, j)
    others = uw.scatter(1, j, float("-inf")).amax(dim=1, keepdim=True)
    dominated = (l_j >= others).squeeze(1).to(torch.float64)  # [C, L]
    cap = uw.amax(dim=1)  # [C, L]
    target = iw.gather(1, j).squeeze(1).long()  # [C, L], flat input positions
    S = au.shape[0]
    a_u, a_l = au.reshape(S, C, -1), al.reshape(S, C, -1)
    pos_u, neg_u = a_u.clamp_min(0), a_u.clamp_max(0)
    pos_l, neg_l = a_l.clamp_min(0), a_l.clamp_max(0)
    coeff_u = pos_u * dominated + neg_u
    coeff_l = pos_l + neg_l * dominated
    bias_u = (pos_u * (1 - dominated) * cap).reshape(S, -1).sum(1)
    bias_l = (neg_l * (1 - dominated) * cap).reshape(S, -1).sum(1)

    def scatter(coeff: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(S, lo.numel(), dtype=torch.float64)
        out.scatter_add_(1, target.reshape(1, -1).expand(S, -1), coeff.reshape(S, -1))
        return out.view(S, *lo.shape)

    return scatter(coeff_u), bias_u, scatter(coeff_l), bias_l


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
