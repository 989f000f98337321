"""Lower bounds to test the certified upper bounds against: random points of the ball and a small
projected gradient ascent on ‖Ψ(c + K e) − Ψ(c)‖₂, all in float64."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def _project(e: torch.Tensor, radius: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return e.clamp(-radius, radius)
    size = e.flatten(1).norm(dim=1).clamp_min(1e-300)
    shrink = (radius / size).clamp(max=1.0)
    return e * shrink.view(-1, *([1] * (e.dim() - 1)))


def _on_boundary(e: torch.Tensor, radius: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return radius * e.sign()
    size = e.flatten(1).norm(dim=1).clamp_min(1e-300)
    return e * (radius / size).view(-1, *([1] * (e.dim() - 1)))


def found_worst(
    model: nn.Module,
    point: torch.Tensor,
    radius: float,
    norm: str = "l2",
    *,
    into: Callable[[torch.Tensor], torch.Tensor] | None = None,
    samples: int = 256,
    restarts: int = 16,
    steps: int = 60,
    seed: int = 0,
) -> float:
    """The largest ‖Ψ(into(y + e)) − Ψ(into(y))‖₂ found over ‖e‖ ≤ ε (y = point, [1, ...])."""
    net = copy.deepcopy(model).double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    y = point.detach().double()
    into = into or (lambda v: v)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clean = net(into(y))

    def change(e: torch.Tensor) -> torch.Tensor:
        out = net(into(y + e))
        return (out - clean).flatten(1).norm(dim=1)

    best = 0.0
    with torch.no_grad():
        for _ in range(max(1, samples // 64)):
            e = torch.randn(64, *y.shape[1:], generator=generator, dtype=torch.float64)
            best = max(best, float(change(_on_boundary(e, radius, norm)).max()))
    e = torch.randn(restarts, *y.shape[1:], generator=generator, dtype=torch.float64)
    e = _on_boundary(e, radius, norm)
    step = 0.25 * radius
    for k in range(steps):
        e.requires_grad_(True)
        value = change(e)
        (grad,) = torch.autograd.grad(value.sum(), e)
        best = max(best, float(value.detach().max()))
        with torch.no_grad():
            if norm == "linf":
                direction = grad.sign()
            else:
                size = grad.flatten(1).norm(dim=1).clamp_min(1e-300)
                direction = grad / size.view(-1, *([1] * (grad.dim() - 1)))
            e = _project(e + step * direction, radius, norm)
            # a dead gradient (all ReLUs off): restart from a fresh random point
            dead = grad.flatten(1).abs().sum(dim=1) == 0
            if bool(dead.any()):
                fresh = torch.randn(int(dead.sum()), *y.shape[1:], generator=generator)
                e[dead] = _on_boundary(fresh.double(), radius, norm)
        if k == steps // 2:
            step /= 4
    with torch.no_grad():
        best = max(best, float(change(e).max()))
    return best
