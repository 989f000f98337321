"""The needle network: a known-answer reconstruction whose worst case hides where no gradient
looks.

    Ψ(y) = y + c · relu(⟨v, y − y₀⟩ − t) · v,     t = depth · ε,   c = (ratio − 1) / (1 − depth),

with v a unit vector (an image), y₀ the clean input and ε the radius of the ball around it. On
the ball the ReLU is off except in the thin cap ⟨v, e⟩ > t of the sphere's neighbourhood around
the direction v. At y₀ (and wherever the ReLU is off) Ψ is the identity: its Jacobian is I, so
every direction has gain 1.00, the gradient of ‖Ψ(y₀ + e) − Ψ(y₀)‖ at any e outside the cap is
e/‖e‖ itself (a projected ascent on the sphere does not move), and a random point of the sphere
lands in the cap with probability about P(N(0, 1) > depth·√n) (depth·√n = 6.4 standard
deviations for depth 0.8 on an 8×8 image).

Its exact worst case. With Δ(e) = Ψ(y₀ + e) − Ψ(y₀) = e + c (⟨v, e⟩ − t)₊ v and ⟨v, e⟩ ≤ ‖e‖:

    ‖Δ(e)‖ ≤ ‖e‖ + c (‖e‖ − t)₊ ≤ ε + c (ε − t) = ratio · ε     for ‖e‖ ≤ ε,

with equality at e = ε v (both inequalities are tight there), and likewise
‖Δ(e)‖/‖e‖ ≤ 1 + c (1 − t/‖e‖)₊ ≤ 1 + c (1 − depth) = ratio: the worst change over the ball is
ratio·ε and the worst Lipschitz ratio from y₀ is `ratio`, both reached only at e = εv. (The
local Lipschitz constant over the whole ball, pairs of points both inside the cap, is larger:
‖I + c v vᵀ‖₂ = 1 + c.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

RATIO = 2.93
DEPTH = 0.8


class Needle(nn.Module):
    """Ψ(y) = y + c · relu(⟨v, y − y₀⟩ − t) · v on images [B, C, H, W] (module docstring)."""

    def __init__(
        self,
        centre: torch.Tensor,
        radius: float,
        direction: torch.Tensor,
        ratio: float = RATIO,
        depth: float = DEPTH,
    ) -> None:
        super().__init__()
        v = direction.flatten().double()
        v = v / v.norm()
        n = v.numel()
        self.gain = (ratio - 1) / (1 - depth)
        self.threshold = depth * radius
        self.probe = nn.Linear(n, 1).double()
        self.probe.weight.data = v.view(1, n).clone()
        self.probe.bias.data = (-(v @ centre.flatten().double()) - self.threshold).view(1)
        self.spike = nn.Linear(1, n, bias=False).double()
        self.spike.weight.data = (self.gain * v).view(n, 1).clone()
        self.image_shape = tuple(centre.shape[1:])

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        spike = self.spike(F.relu(self.probe(torch.flatten(y, 1))))
        return y + spike.view(-1, *self.image_shape)


def needle_case(
    size: int = 8, level: float = 0.05, seed: int = 0
) -> tuple[Needle, torch.Tensor, float, torch.Tensor]:
    """The needle around a random image y₀ (float64, [1, 1, size, size]) at the relative level
    δ (ε = δ‖y₀‖, as a worst_case level is): (model, y₀, ε, v)."""
    generator = torch.Generator().manual_seed(seed)
    y0 = torch.rand(1, 1, size, size, generator=generator, dtype=torch.float64)
    # the direction from a stream of its own: a search seeded like the image must not draw it
    generator = torch.Generator().manual_seed(10_007 + seed)
    v = torch.randn(1, 1, size, size, generator=generator, dtype=torch.float64)
    v = v / v.norm()
    eps = level * float(y0.norm())
    return Needle(y0, eps, v), y0, eps, v


def exact_worst_change(eps: float, ratio: float = RATIO) -> float:
    """sup over ‖e‖ ≤ ε of ‖Ψ(y₀ + e) − Ψ(y₀)‖ (module docstring)."""
    return ratio * eps


def gate(found: float, upper: float, threshold: float) -> str:
    """A threshold on the worst Lipschitz ratio, judged from a bracket found ≤ sup ≤ upper:
    'fail' when the search already exceeds it, 'proven' when the certified bound is below it,
    'open' otherwise. A gate on `found` alone would call every 'open' a pass."""
    if found > threshold:
        return "fail"
    return "proven" if upper <= threshold else "open"


def random_in_cap(
    v: torch.Tensor, eps: float, depth: float, count: int, generator: torch.Generator
) -> torch.Tensor:
    """Points e of the ball with ⟨v, e⟩ > depth·ε (inside the needle), [count, *v.shape[1:]]."""
    n = v.numel()
    flat = v.flatten()
    noise = torch.randn(count, n, generator=generator, dtype=torch.float64)
    noise = noise - (noise @ flat)[:, None] * flat  # orthogonal to v
    noise = noise / noise.norm(dim=1, keepdim=True)
    along = depth + (1 - depth) * torch.rand(count, generator=generator, dtype=torch.float64)
    across = torch.sqrt(1 - along**2) * torch.rand(count, generator=generator, dtype=torch.float64)
    e = eps * (along[:, None] * flat + across[:, None] * noise)
    assert math.isclose(float(flat.norm()), 1.0)
    return e.view(count, *v.shape[1:])
