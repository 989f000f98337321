"""`lipschitz`: the spectral norm ‖J_Ψ(y)‖₂ of the Jacobian at each measurement, by a Lanczos
iteration on JᵀJ restricted to the measured entries — a lower bound of the local Lipschitz
constant of Ψ around y — with the accuracy its residual proves.

One forward pass per batch builds the graph; each iteration then costs two backward passes:
J v by the double-backward trick (differentiate Jᵀu, which is linear in u, with respect to u)
and Jᵀ(J v) by an ordinary vector–Jacobian product. This works for any model whose backward is
differentiable (eager, TorchScript, torch.export all are).

The iteration: Lanczos with full reorthogonalisation (explicitly restarted from its Ritz vector
every RESTART iterations, so the basis stays small), started from a seeded random direction.
After k iterations the largest Ritz value θ of the tridiagonal Tₖ is the Rayleigh quotient of
its Ritz vector u, so σ = √θ ≤ σ_max(J) (up to float rounding), and its residual
‖JᵀJ u − θ u‖ = βₖ·|last entry of Tₖ's eigenvector| bounds its error: JᵀJ has an eigenvalue
within the residual of θ, i.e. J has a singular value in [σ·√(1 − ρ), σ·√(1 + ρ)], ρ the
residual over θ. The reported `accuracy` is √(1 + ρ) − 1, and a row stops once it is at most
`tolerance`. A stop on a small change of the estimate would not do: on near-equal top singular
values the power iteration's estimate creeps up by less than the tolerance per iteration while
still short of σ_max. Unlike the power iteration's, Lanczos' Ritz value reaches the top of a
cluster of near-equal singular values in a few iterations (a Krylov space of a matrix with two
distinct eigenvalues has dimension 2).

With `certify`, each shard then bounds the norm over a ball around every measurement from above
(`lipschitz_bracket`; docs/theorem.md, "Brackets").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from schemas.checks import LipschitzCheck
from schemas.sampler import AveragingSettings
from schemas.verdicts import compare, judge, proven_by
from workers.engine.checks.lipschitz_bracket import (
    certify_lipschitz_shard,
    merge_lipschitz_bracket,
)
from workers.engine.context import AuditContext, Subject
from workers.engine.sampling import (
    averaged_subject,
    compare_estimate,
    replicate_statistics,
    same_draws,
    summary_errors,
)
from workers.engine.shards import derive_seed
from workers.engine.stats import summary

# What the check measures for a stochastic model (the result's `sampler.measures`).
SAMPLER_MEASURES = (
    "the Jacobian spectral norm of the average map Ψ̄(y) = EΨ(y) (a lower bound of its local "
    "Lipschitz constant): the Lanczos search runs on an average of `draws` calls (one fixed set "
    "of draws), and the norm along the direction it found is re-evaluated on `replicates` fresh "
    "averages; `jacobian_norm` is their mean, `standard_error` its standard error "
    "(`search_jacobian_norm`: the search's own figure, on its own draws)"
)

# Lanczos vectors kept before an explicit restart from the Ritz vector (memory: RESTART × batch
# × measurement size)
RESTART = 64


def _batched(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner product, accumulated in float64: [B]."""
    return (a.flatten(1).double() * b.flatten(1).double()).sum(1)


def _top_ritz(
    alphas: list[torch.Tensor], betas: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The largest eigenvalue θ of each row's tridiagonal T (diagonal `alphas`, off-diagonal the
    first len(alphas) − 1 `betas`), its eigenvector s [B, k] and the residual βₖ·|s_k| [B]."""
    k = len(alphas)
    diagonal = torch.stack(alphas, dim=1)  # [B, k]
    t = torch.diag_embed(diagonal)
    if k > 1:
        off = torch.stack(betas[: k - 1], dim=1)
        t = t + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    finite = torch.isfinite(t).flatten(1).all(1)
    values, vectors = torch.linalg.eigh(torch.where(_batched(finite, t), t, torch.zeros_like(t)))
    theta, s = values[:, -1], vectors[:, :, -1]
    residual = betas[k - 1].abs() * s[:, -1].abs()
    nan = torch.full_like(theta, math.nan)
    return torch.where(finite, theta, nan), s, torch.where(finite, residual, nan)


def accuracy_of(theta: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """√(1 + ‖r‖/θ) − 1: J has a singular value within this relative distance above √θ."""
    ratio = torch.where(residual == 0, torch.zeros_like(theta), residual / theta.clamp_min(0))
    return torch.sqrt(1 + ratio) - 1


def jacobian_spectral_norms(
    ctx: AuditContext,
    subject: Subject,
    y: torch.Tensor,
    start: torch.Tensor,
    iterations: int,
    tolerance: float,
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """σ_max of J_Ψ at each row of y (measured entries only), the iterations each needed and the
    accuracy its residual proves (module docstring; float64 [B]); see `_lanczos`."""
    sigma, used, accuracy, _ = _lanczos(ctx, subject, y, start, iterations, tolerance)
    return sigma, used, accuracy


def _lanczos(
    ctx: AuditContext,
    subject: Subject,
    y: torch.Tensor,
    start: torch.Tensor,
    iterations: int,
    tolerance: float,
) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
    """σ_max of J_Ψ at each row of y (measured entries only), the iterations each needed, the
    accuracy its residual proves (module docstring; float64 [B]) and the last Ritz vector
    (unit in the operator's norm, shaped like y): the direction the norm was found along.

    `start` is the initial direction per row. A row stops updating once its accuracy is at most
    `tolerance`, but not before half the iterations (at least 2): a residual bounds the distance
    to the NEAREST singular value, and after one iteration from a start with a small component
    along the top direction that is the wrong one (e.g. 1, 0.999, 0.999, …: the first Rayleigh
    quotient is about 0.999 with a residual near 0); a Krylov space of that many iterations
    holds the top direction unless the start missed it altogether. An invariant Krylov space
    (Lanczos' βₖ = 0) ends a row at once: its Ritz values are exact."""
    operator = ctx.operator
    y = y.detach().requires_grad_(True)
    out = subject.reconstruct(y)
    probe = torch.zeros_like(out, requires_grad=True)
    (jt_probe,) = torch.autograd.grad(out, y, grad_outputs=probe, create_graph=True)
    subject.counter.backward += y.shape[0]

    def gram(v: torch.Tensor) -> torch.Tensor:
        # J v: the derivative of Jᵀ·probe with respect to probe, applied to v; then Jᵀ(J v)
        (jv,) = torch.autograd.grad(jt_probe, probe, grad_outputs=v, retain_graph=True)
        (jtjv,) = torch.autograd.grad(out, y, grad_outputs=jv, retain_graph=True)
        subject.counter.backward += 2 * y.shape[0]
        return operator.project(jtjv).detach()

    def unit(v: torch.Tensor) -> torch.Tensor:
        v = operator.project(v)
        return v / _batched(operator.norm(v).clamp_min(1e-30), v)

    rows = y.shape[0]
    sigma = torch.zeros(rows, dtype=torch.float64, device=y.device)
    accuracy = torch.full((rows,), math.inf, dtype=torch.float64, device=y.device)
    done = torch.zeros(rows, dtype=torch.bool, device=y.device)
    used = [iterations] * rows
    min_iterations = min(iterations, max(2, math.ceil(iterations / 2)))
    q = unit(start.detach())
    ritz = q
    basis: list[torch.Tensor] = []
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    for step in range(1, iterations + 1):
        basis.append(q)
        w = gram(q)
        alphas.append(_dot(q, w))
        # full reorthogonalisation, twice ("twice is enough")
        for _ in range(2):
            for previous in basis:
                w = w - _batched(_dot(previous, w).to(w.dtype), w) * previous
        beta = operator.norm(w).double()
        betas.append(beta)
        theta, s, residual = _top_ritz(alphas, betas)
        # θ = 0 (a zero Jacobian) has nothing to iterate on: σ = 0 is exact
        estimate = torch.sqrt(theta.clamp_min(0))
        exact = (beta <= 1e-7 * theta.abs()) | (theta == 0)
        step_accuracy = torch.where(exact, torch.zeros_like(theta), accuracy_of(theta, residual))
        sigma = torch.where(done, sigma, estimate)
        accuracy = torch.where(done, accuracy, step_accuracy)
        settled = (step_accuracy <= tolerance) & (step >= min_iterations)
        newly_done = (~done) & (settled | exact | ~torch.isfinite(theta))
        for row in torch.nonzero(newly_done).flatten().tolist():
            used[row] = step
        done = done | newly_done
        if bool(done.all()) or step == iterations:
            stacked = torch.stack(basis, dim=1)  # [B, k, ...]
            weights = s.to(stacked.dtype).view(rows, -1, *([1] * (stacked.dim() - 2)))
            ritz = unit(torch.nan_to_num((stacked * weights).sum(1)))
            break
        if len(basis) == RESTART:
            # restart from the Ritz vector: the best direction found so far
            stacked = torch.stack(basis, dim=1)  # [B, k, ...]
            weights = s.to(stacked.dtype).view(rows, -1, *([1] * (stacked.dim() - 2)))
            q = unit((stacked * weights).sum(1))
            basis, alphas, betas = [], [], []
            continue
        q = w / _batched(beta.clamp_min(1e-30).to(w.dtype), w)
    return sigma, used, accuracy, ritz


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
        if subject.stochastic:
            result = _run_on_average(config, ctx, subject, y, start, indices, seed)
        else:
            result = self._measure(config, ctx, subject, y, start, indices)
        if config.certify is not None:  # the bracket's upper ends (lipschitz_bracket)
            rows = result["per_image"]
            result["certify"] = certify_lipschitz_shard(config, ctx, subject, indices, rows)
        return result

    def _measure(
        self,
        config: LipschitzCheck,
        ctx: AuditContext,
        subject: Subject,
        y: torch.Tensor,
        start: torch.Tensor,
        indices: Sequence[int],
    ) -> dict[str, Any]:
        sigma, used, accuracy = jacobian_spectral_norms(
            ctx, subject, y, start, config.iterations, config.tolerance
        )
        return {
            "per_image": [
                # JSON has no NaN or infinity: a non-finite norm (or accuracy) is recorded as null
                {
                    "index": int(index),
                    "jacobian_norm": s if math.isfinite(s) else None,
                    "iterations": n,
                    "accuracy": a if math.isfinite(s) and math.isfinite(a) else None,
                }
                for index, s, n, a in zip(
                    indices, sigma.tolist(), used, accuracy.tolist(), strict=True
                )
            ]
        }

    def merge(self, config: LipschitzCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
        per_image = [row for shard in shards for row in shard["per_image"]]
        norms = [row["jacobian_norm"] for row in per_image if row["jacobian_norm"] is not None]
        non_finite = len(per_image) - len(norms)
        warnings = []
        # the residual's accuracy, not the iteration count, says whether a norm is converged
        unconverged = [
            row
            for row in per_image
            if row["jacobian_norm"] is not None
            and (row.get("accuracy") is None or row["accuracy"] > config.tolerance)
        ]
        if unconverged and config.tolerance > 0:
            worst = max(
                (math.inf if row.get("accuracy") is None else row["accuracy"])
                for row in unconverged
            )
            warnings.append(
                f"the Lanczos iteration did not reach accuracy {config.tolerance} (from its "
                f"residual) in {config.iterations} iterations for {len(unconverged)} image(s), "
                f"worst {worst:.3g}: the norms reported are lower bounds, and the largest "
                "singular value may lie that much (relative) above them"
            )
        if non_finite:
            warnings.append(f"the Jacobian norm is not finite for {non_finite} image(s)")
        comparisons = []
        sampler = shards[0].get("sampler") if shards else None
        if config.threshold is not None:
            bound = config.threshold.max_jacobian_norm
            largest = max(norms) if norms else None
            if sampler is None:
                comparisons.append(compare("largest Jacobian spectral norm", largest, bound))
            else:  # an estimate of the average map's: judged on its interval's upper end
                comparison, warning = compare_estimate(
                    "largest Jacobian spectral norm",
                    largest,
                    _largest_error(per_image),
                    int(sampler["replicates"]),
                    bound,
                )
                comparisons.append(comparison)
                if warning is not None:
                    warnings.append(warning)
            if non_finite:  # a non-finite norm cannot be below any bound
                comparisons.append(
                    compare("images whose Jacobian norm is not finite", non_finite, 0)
                )
        result: dict[str, Any] = {
            "jacobian_norm": (
                summary(norms, ("mean", "max")) if norms else {"mean": None, "max": None}
            ),
            "per_image": per_image,
            "warnings": warnings,
        }
        if sampler is not None:  # a stochastic subject: the average map's figures
            finite = [row for row in per_image if row["jacobian_norm"] is not None]
            result["standard_error"] = summary_errors(
                [row["jacobian_norm"] for row in finite],
                [_or_nan(row.get("standard_error")) for row in finite],
                ("mean", "max"),
            )
            result["sampler"] = {**sampler, "measures": SAMPLER_MEASURES}
        if config.certify is None:
            return judge(result, comparisons)
        section, bracket, certified = merge_lipschitz_bracket(config, shards, comparisons, warnings)
        result["certify"] = section
        result["certified"] = bracket
        return judge(result, comparisons + certified, proven_by(result))


def _largest_error(per_image: list[dict[str, Any]]) -> float | None:
    """The standard error of the image whose norm is the largest (as `standard_error.max`)."""
    finite = [row for row in per_image if row["jacobian_norm"] is not None]
    if not finite:
        return None
    error = max(finite, key=lambda row: row["jacobian_norm"]).get("standard_error")
    return None if error is None else float(error)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def jacobian_norms_along(
    ctx: AuditContext, subject: Subject, y: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor:
    """‖J_Ψ(y) v‖ per row (v unit in the operator's norm; the output's whole norm), float64
    [B]: one forward pass and two backward passes (the double-backward trick of `gram`)."""
    y = y.detach().requires_grad_(True)
    with torch.enable_grad():
        out = subject.reconstruct(y)
        probe = torch.zeros_like(out, requires_grad=True)
        (jt_probe,) = torch.autograd.grad(out, y, grad_outputs=probe, create_graph=True)
        (jv,) = torch.autograd.grad(jt_probe, probe, grad_outputs=direction.detach())
    subject.counter.backward += 2 * y.shape[0]
    size = ctx.operator.norm(direction).double().clamp_min(1e-30)
    return jv.detach().flatten(1).double().norm(dim=1) / size


def _run_on_average(
    config: LipschitzCheck,
    ctx: AuditContext,
    subject: Subject,
    y: torch.Tensor,
    start: torch.Tensor,
    indices: Sequence[int],
    seed: int,
) -> dict[str, Any]:
    """A stochastic subject: Lanczos on an R-draw average, then the norm along the direction it
    found on K fresh averages (SAMPLER_MEASURES)."""
    settings = config.sampler or AveragingSettings()
    averaged = averaged_subject(subject, settings.draws)
    with same_draws(derive_seed(seed, "lipschitz", "search"), ctx.device):
        sigma, used, accuracy, direction = _lanczos(
            ctx, averaged, y, start, config.iterations, config.tolerance
        )
    along = []
    for replicate in range(settings.replicates):
        with same_draws(derive_seed(seed, "lipschitz", "replicate", replicate), ctx.device):
            along.append(jacobian_norms_along(ctx, averaged, y, direction))
    mean, error = replicate_statistics(torch.stack(along))
    rows = []
    for k, index in enumerate(indices):
        found = float(sigma[k])
        rows.append(
            {
                "index": int(index),
                "jacobian_norm": _finite(float(mean[k])),
                "standard_error": _finite(float(error[k])),
                "search_jacobian_norm": _finite(found),
                "iterations": used[k],
                "accuracy": _finite(float(accuracy[k])) if math.isfinite(found) else None,
            }
        )
    return {
        "per_image": rows,
        "sampler": {"draws": settings.draws, "replicates": settings.replicates},
    }
