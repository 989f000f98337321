"""`lipschitz`: the spectral norm ‖J_Ψ(y)‖₂ of the Jacobian at each measurement, by power
iteration on JᵀJ restricted to the measured entries — a lower bound of the local Lipschitz
constant of Ψ around y.

One forward pass per batch builds the graph; each iteration then costs two backward passes:
J v by the double-backward trick (differentiate Jᵀu, which is linear in u, with respect to u)
and Jᵀ(J v) by an ordinary vector–Jacobian product. This works for any model whose backward is
differentiable (eager, TorchScript, torch.export all are)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from schemas.checks import LipschitzCheck
from schemas.verdicts import compare, judge
from workers.engine.context import AuditContext, Subject
from workers.engine.shards import derive_seed
from workers.engine.stats import summary


def _batched(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def jacobian_spectral_norms(
    ctx: AuditContext,
    subject: Subject,
    y: torch.Tensor,
    start: torch.Tensor,
    iterations: int,
    tolerance: float,
) -> tuple[torch.Tensor, list[int]]:
    """σ_max of J_Ψ at each row of y (measured entries only) and the iterations each needed.

    `start` is the initial direction per row. A row stops updating once its estimate changes by
    less than `tolerance` (relative) between two iterations."""
    operator = ctx.operator
    y = y.detach().requires_grad_(True)
    out = subject.reconstruct(y)
    probe = torch.zeros_like(out, requires_grad=True)
    (jt_probe,) = torch.autograd.grad(out, y, grad_outputs=probe, create_graph=True)
    subject.counter.backward += y.shape[0]

    v = operator.project(start)
    v = v / _batched(operator.norm(v).clamp_min(1e-30), v)
    sigma = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    done = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    used = [iterations] * y.shape[0]
    for step in range(1, iterations + 1):
        # J v: the derivative of Jᵀ·probe with respect to probe, applied to v
        (jv,) = torch.autograd.grad(jt_probe, probe, grad_outputs=v, retain_graph=True)
        (jtjv,) = torch.autograd.grad(out, y, grad_outputs=jv, retain_graph=True)
        subject.counter.backward += 2 * y.shape[0]
        jtjv = operator.project(jtjv)
        estimate = jv.flatten(1).norm(dim=1).double()  # ‖J v‖ with ‖v‖ = 1
        change = (estimate - sigma).abs() / estimate.clamp_min(1e-30)
        newly_done = (~done) & (change <= tolerance) & (step > 1)
        sigma = torch.where(done, sigma, estimate)
        for row in torch.nonzero(newly_done).flatten().tolist():
            used[row] = step
        done = done | newly_done
        if bool(done.all()):
            break
        norms = operator.norm(jtjv)
        next_v = jtjv / _batched(norms.clamp_min(1e-30), jtjv)
        # a zero Jacobian has nothing to iterate on: σ = 0 is exact
        v = torch.where(_batched(done | (norms == 0), v), v, next_v).detach()
    return sigma, used


class Lipschitz:
    kind = "lipschitz"

    def run(
        self,
        config: LipschitzCheck,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]:
        y = ctx.measurements(indices)
        start = torch.stack(
            [
                torch.randn(
                    tuple(y.shape[1:]),
                    generator=torch.Generator().manual_seed(derive_seed(seed, index)),
                )
                for index in indices
            ]
        ).to(ctx.device)
        sigma, used = jacobian_spectral_norms(
            ctx, subject, y, start, config.iterations, config.tolerance
        )
        return {
            "per_image": [
                # JSON has no NaN or infinity: a non-finite norm is recorded as null
                {
                    "index": int(index),
                    "jacobian_norm": s if math.isfinite(s) else None,
                    "iterations": n,
                }
                for index, s, n in zip(indices, sigma.tolist(), used, strict=True)
            ]
        }

    def merge(self, config: LipschitzCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
        per_image = [row for shard in shards for row in shard["per_image"]]
        norms = [row["jacobian_norm"] for row in per_image if row["jacobian_norm"] is not None]
        non_finite = len(per_image) - len(norms)
        warnings = []
        unconverged = [row["index"] for row in per_image if row["iterations"] >= config.iterations]
        if unconverged and config.tolerance > 0:
            warnings.append(
                f"power iteration did not reach tolerance {config.tolerance} in "
                f"{config.iterations} iterations for {len(unconverged)} image(s); "
                "the norms reported are lower bounds"
            )
        if non_finite:
            warnings.append(f"the Jacobian norm is not finite for {non_finite} image(s)")
        comparisons = []
        if config.threshold is not None:
            bound = config.threshold.max_jacobian_norm
            largest = max(norms) if norms else None
            comparisons.append(compare("largest Jacobian spectral norm", largest, bound))
            if non_finite:  # a non-finite norm cannot be below any bound
                comparisons.append(
                    compare("images whose Jacobian norm is not finite", non_finite, 0)
                )
        result = {
            "jacobian_norm": (
                summary(norms, ("mean", "max")) if norms else {"mean": None, "max": None}
            ),
            "per_image": per_image,
            "warnings": warnings,
        }
        return judge(result, comparisons)
