"""`false_negative`: is a small lesion z recovered? (FNAF, Cheng et al. 2020; the theorem's
part (b): false negatives occur with positive probability under random noise.)

Recovery at a placement: ρ = ⟨Ψ(A(x+z)+e) − Ψ(Ax+e), z⟩ / ‖z‖², 1 for a perfect recovery, 0 for
a lesion washed out. `y = Ax + e₀` are the audit's measurements, so A(x+z) + e₀ = y + Az.
Searches (docs/theorem.md):

- `random`: every placement is a trial (e = 0);
- `adversarial`: per placement, projected sign-gradient descent on ρ/ρ_A⁺ over the lesion's pixel
  values (each in [¼, 1] × contrast on its support) and, with measurement_delta > 0, a joint
  measurement perturbation ‖e‖ ≤ δ‖y‖;
- `noise`: noise_samples Gaussian e with ‖e‖ = noise_level·‖y‖ per placement, every draw a trial.

The network is held against what the data carries: next to ρ, every placement gets the
recovery of the data-consistent reference A⁺ (the minimum-norm solution), ρ_A⁺ = ⟨A⁺A z, z⟩ /
‖z‖², its `visible_fraction` (A⁺ is linear, so x and e cancel). A trial is a miss when
ρ < relative_threshold · ρ_A⁺ (the network keeps less than that share of what A⁺ recovers):
recovering more than the data holds would take the overperformance the theorem makes unstable,
so ρ_A⁺, not 1, is the full score. Where ρ_A⁺ < min_visible_fraction the data essentially does
not carry the lesion: the placement is `unrecoverable` and no trial.

`random` and `noise` run forward passes only (under `torch.no_grad()`): an endpoint model
(workers.engine.endpoint_model) runs them unchanged, its queries charged to (false_negative,
None) by the audit; `adversarial` differentiates through the model, so the audit refuses it for
an endpoint model (workers.engine.endpoint_model.check_query_only_config).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from schemas.checks_theorem import FalseNegativeCheck
from schemas.sampler import DrawSettings
from schemas.verdicts import compare, judge
from workers.engine.checks.theorem_common import (
    is_complex,
    panel_record,
    shown,
    shown_difference,
    value_span,
    worst_panels,
)
from workers.engine.context import ARTIFACT_FILES_KEY, AuditContext, Subject
from workers.engine.lesions import (
    Placement,
    explicit_placements,
    lesion_image,
    random_placements,
    support,
)
from workers.engine.noise import unit_noise
from workers.engine.nullspace import RowSpaceProjector, row_space_projector
from workers.engine.sampling import averaged_subject, same_draws, single_draws
from workers.engine.shards import derive_seed
from workers.engine.stats import clopper_pearson

# What the check measures for a stochastic model (the result's `sampler.measures`).
SAMPLER_MEASURES = (
    "a miss rate over the sampler's draws: at each placement (its lesion found by the search "
    "under `adversarial`, which then runs on an average of `draws` calls, the same draws at "
    "every step), `samples` separate calls give single draws Ψ(y + Az + e), each a trial judged "
    "by ρ = ⟨Ψ(y + Az + e) − Ψ̄(y + e), z⟩ / ‖z‖² against the average Ψ̄ of `draws` calls without "
    "the lesion; under `noise` every noise draw is a call drawing anew too (the rate is over "
    "both), judged against the average at the same noise; miss_rate's Clopper–Pearson interval "
    "is over placements × draws, and a threshold bounds its upper end"
)

# The adversarial search keeps every lesion pixel at least this fraction of its contrast, so
# that the optimised lesion is still a lesion (ρ is undefined as z → 0).
MIN_LESION_FRACTION = 0.25
# Pixels around the lesion's bounding box in FNAF's lesion-window NMSE.
WINDOW_MARGIN = 2
# ρ ≥ bar − RECOVERY_TOLERANCE counts as reaching the bar (ρ against relative_threshold·ρ_A⁺,
# ρ_A⁺ against min_visible_fraction), so that a tie is not decided by float rounding: ρ from
# float32 images errs by about 6e-8 / contrast, under 1e-5 for lesions of 1 % contrast and
# more, and 1e-5 is far below any recovery that matters.
RECOVERY_TOLERANCE = 1e-5
_TINY = 1e-12


def recovery(out_z: torch.Tensor, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """ρ = ⟨Ψ(y + Az) − Ψ(y), z⟩ / ‖z‖² per sample, [B]."""
    inner = ((out_z - out) * z).flatten(1).sum(1)
    return inner / z.flatten(1).pow(2).sum(1).clamp_min(_TINY)


def is_recovered(rho: float, threshold: float) -> bool:
    """ρ reaches `threshold`, ties within RECOVERY_TOLERANCE included; NaN and infinite ρ never
    do."""
    return math.isfinite(rho) and rho >= threshold - RECOVERY_TOLERANCE


def is_carried(visible: float, config: FalseNegativeCheck) -> bool:
    """The placement is judged: the data carries at least min_visible_fraction of the lesion."""
    return is_recovered(visible, config.min_visible_fraction)


def is_kept(rho: float, visible: float, config: FalseNegativeCheck) -> bool:
    """The network keeps enough of what A⁺ recovers: ρ ≥ relative_threshold · ρ_A⁺ (ties
    within RECOVERY_TOLERANCE of ρ included; NaN never)."""
    return is_recovered(rho, config.relative_threshold * visible)


def relative_recovery(rho: float | None, visible: float, carried: bool) -> float | None:
    """ρ / ρ_A⁺ at a judged placement (1: what A⁺ recovers); None elsewhere or for NaN ρ."""
    if not carried or rho is None or not math.isfinite(rho) or visible <= 0.0:
        return None
    return rho / visible


def visible_fraction(reference: RowSpaceProjector, z: torch.Tensor) -> torch.Tensor:
    """ρ_A⁺ = ⟨A⁺A z, z⟩ / ‖z‖² per lesion, [B] float64: the share of the lesion's energy the
    measurements carry (A⁺A is an orthogonal projection, so the value lies in [0, 1]; the
    clamp only removes rounding)."""
    with torch.no_grad():
        visible = reference(z).double()
    flat = z.double().flatten(1)
    share = (visible.flatten(1) * flat).sum(1) / flat.pow(2).sum(1).clamp_min(_TINY)
    return share.clamp(0.0, 1.0)


def window_nmse(out_z: torch.Tensor, truth: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """FNAF's lesion-window NMSE: ‖W(Ψ(y+Az) − (x+z))‖² / ‖W(x+z)‖², [B]."""
    error = ((out_z - truth) * window).flatten(1).pow(2).sum(1)
    return error / (truth * window).flatten(1).pow(2).sum(1).clamp_min(_TINY)


def _window(pattern: torch.Tensor, placement: Placement, shape: Sequence[int]) -> torch.Tensor:
    _, height, width = shape
    h, w = pattern.shape
    window = torch.zeros(tuple(shape))
    r0, c0 = max(0, placement.row - WINDOW_MARGIN), max(0, placement.col - WINDOW_MARGIN)
    r1 = min(height, placement.row + h + WINDOW_MARGIN)
    c1 = min(width, placement.col + w + WINDOW_MARGIN)
    window[:, r0:r1, c0:c1] = 1.0
    return window


class FalseNegative:
    kind = "false_negative"

    def run(
        self,
        config: FalseNegativeCheck,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]:
        complex_image = is_complex(ctx)
        shape = tuple(ctx.images.shape[1:])
        amplitude = config.lesion.contrast * value_span(ctx)
        pattern = support(config.lesion, derive_seed(seed, "lesion"))
        warnings: list[str] = []
        rows: list[dict[str, Any]] = []
        panels: list[dict[str, Any]] = []
        reference = row_space_projector(ctx.operator, ctx.device)
        for index in indices:
            x = ctx.images[index]
            if config.positions is not None:
                placements = explicit_placements(config.positions, pattern, shape)
            else:
                placements = random_placements(
                    x.cpu(),
                    pattern,
                    config.placements,
                    derive_seed(seed, index, "placements"),
                    ctx.value_range,
                    complex_image,
                    warnings,
                    index,
                )
            z = torch.stack(
                [lesion_image(pattern, p, shape, amplitude, complex_image) for p in placements]
            ).to(ctx.device)
            windows = torch.stack([_window(pattern, p, shape) for p in placements]).to(ctx.device)
            y = ctx.measurements([index])
            found = _search(config, ctx, subject, reference, index, x, y, z, windows, seed)
            for k, placement in enumerate(placements):
                rows.append(
                    {
                        "index": int(index),
                        "row": placement.row,
                        "col": placement.col,
                        **{name: values[k] for name, values in found["rows"].items()},
                    }
                )
            panels.extend(_panels(config, found, placements, x, index, complex_image))
        panels.sort(key=lambda p: p["score"])
        if reference.method == "cg" and reference.used >= reference.iterations:
            warnings.append(
                f"A⁺ by conjugate gradients stopped at {reference.iterations} iterations: "
                "visible fractions may be underestimated"
            )
        result: dict[str, Any] = {
            "rows": rows,
            "panels": panels[: config.panels],
            "warnings": warnings,
            "reference_method": reference.method,
        }
        if subject.stochastic:
            settings = config.sampler or DrawSettings()
            result["sampler"] = {"draws": settings.draws, "samples": settings.samples}
        return result

    def merge(self, config: FalseNegativeCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for shard in shards for row in shard["rows"]]
        warnings = [w for shard in shards for w in shard.get("warnings", [])]
        # trials are the recoverable placements' (their draws under `noise`) only
        misses = sum(row["misses"] for row in rows)
        trials = sum(row["trials"] for row in rows)
        unrecoverable = sum(1 for row in rows if not row["recoverable"])
        nonfinite = sum(row["nonfinite"] for row in rows)
        if nonfinite:
            warnings.append(
                f"the model returned NaN or infinite values {nonfinite} times; at recoverable "
                "placements those trials are misses"
            )
        counted = [row for row in rows if row["recoverable"] and row["recovery_min"] is not None]
        recovery_sum = math.fsum(row["recovery_sum"] for row in counted)
        recovery_count = sum(row["recovery_count"] for row in counted)
        # ρ_A⁺ is fixed per placement, so the relative recoveries are ρ's divided by it
        relative = [row for row in counted if (row.get("visible_fraction") or 0.0) > 0.0]
        relative_sum = math.fsum(row["recovery_sum"] / row["visible_fraction"] for row in relative)
        relative_count = sum(row["recovery_count"] for row in relative)
        worst = min(
            relative, key=lambda row: row["recovery_min"] / row["visible_fraction"], default=None
        )
        visible = [row["visible_fraction"] for row in rows if "visible_fraction" in row]
        if trials:
            low, high = clopper_pearson(misses, trials)
            miss_rate = {"estimate": misses / trials, "ci_low": low, "ci_high": high}
        else:
            miss_rate = {"estimate": None, "ci_low": None, "ci_high": None}
            warnings.append(
                "no placement is recoverable: the measurements carry less than "
                "min_visible_fraction of every lesion, so no trial judges the network"
            )
        result: dict[str, Any] = {
            "search": config.search,
            "lesion": config.lesion.model_dump(mode="json"),
            "relative_threshold": config.relative_threshold,
            "min_visible_fraction": config.min_visible_fraction,
            "recovery_tolerance": RECOVERY_TOLERANCE,
            "reference_method": shards[0].get("reference_method") if shards else None,
            "images": len({row["index"] for row in rows}),
            "placements": len(rows),
            "unrecoverable": {
                "count": unrecoverable,
                "fraction": unrecoverable / len(rows) if rows else None,
            },
            "trials": trials,
            "misses": misses,
            "miss_rate": miss_rate,
            "recovery": {
                "mean": recovery_sum / recovery_count if recovery_count else None,
                "min": min((row["recovery_min"] for row in counted), default=None),
            },
            "relative_recovery": {
                "mean": relative_sum / relative_count if relative_count else None,
                "min": None if worst is None else worst["recovery_min"] / worst["visible_fraction"],
            },
            "visible_fraction": {
                "mean": math.fsum(visible) / len(visible) if visible else None,
                "min": min(visible, default=None),
                "max": max(visible, default=None),
            },
            "worst_placement": None if worst is None else _worst_placement(worst),
            "per_placement": [
                {k: v for k, v in row.items() if k not in _INTERNAL_KEYS} for row in rows
            ],
        }
        sampler = shards[0].get("sampler") if shards else None
        if sampler is not None:
            result["sampler"] = {**sampler, "measures": SAMPLER_MEASURES}
        comparisons = []
        # without trials nothing the data carries was tested: no comparison, verdict `info`
        if config.threshold is not None and trials:
            # a search reports what it found; random noise (or a sampler's draws) is a
            # probability: its upper bound
            noise = config.search == "noise" or sampler is not None
            comparisons.append(
                compare(
                    "miss rate (upper 95 % bound)" if noise else "miss rate",
                    high if noise else misses / trials,
                    config.threshold.max_miss_rate,
                )
            )
        judge(result, comparisons)
        result["warnings"] = warnings
        result[ARTIFACT_FILES_KEY] = worst_panels(shards, config.panels, "false_negative")
        return result


# per-placement values merge() sums and then drops
_INTERNAL_KEYS = ("recovery_sum", "recovery_count", "nonfinite")


def _worst_placement(row: dict[str, Any]) -> dict[str, Any]:
    """The judged placement of the lowest relative recovery: both fractions side by side."""
    return {
        "index": row["index"],
        "row": row["row"],
        "col": row["col"],
        "recovery": row["recovery_min"],
        "visible_fraction": row["visible_fraction"],
        "relative_recovery": row["recovery_min"] / row["visible_fraction"],
    }


def _search(
    config: FalseNegativeCheck,
    ctx: AuditContext,
    subject: Subject,
    reference: RowSpaceProjector,
    index: int,
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    windows: torch.Tensor,
    seed: int,
) -> dict[str, Any]:
    """Per-placement rows (lists over placements) plus the tensors of each placement's worst
    trial for the panels: `lesion`, `out_z`, `out`. Misses count only where the placement is
    recoverable (A⁺ recovers the lesion)."""
    if subject.stochastic:
        return _search_sampler(config, ctx, subject, reference, index, x, y, z, windows, seed)
    if config.search == "noise":
        return _noise(config, ctx, subject, reference, index, x, y, z, windows, seed)
    if config.search == "adversarial":
        z, e = _adversarial(config, ctx, subject, reference, y, z)
    else:
        e = torch.zeros_like(y)
    with torch.no_grad():
        count = z.shape[0]
        out = subject.reconstruct(y + e)
        out_z = subject.reconstruct(y.expand(count, *y.shape[1:]) + ctx.operator.A(z) + e)
        rho = recovery(out_z, out, z)
        nmse = window_nmse(out_z, x + z, windows)
    values = rho.double().cpu().tolist()
    visible = visible_fraction(reference, z).cpu().tolist()
    recoverable = [is_carried(v, config) for v in visible]
    missed = [
        r and not is_kept(rho_k, v, config)
        for r, rho_k, v in zip(recoverable, values, visible, strict=True)
    ]
    counted = [r and math.isfinite(v) for r, v in zip(recoverable, values, strict=True)]
    relative = [
        relative_recovery(rho_k, v, r)
        for rho_k, v, r in zip(values, visible, recoverable, strict=True)
    ]
    rows = {
        "recovery": [_finite(v) for v in values],
        "recovery_min": [_finite(v) for v in values],
        "visible_fraction": visible,
        "relative_recovery": relative,
        "recoverable": recoverable,
        "recovery_sum": [v if c else 0.0 for v, c in zip(values, counted, strict=True)],
        "recovery_count": [int(c) for c in counted],
        "nonfinite": [0 if math.isfinite(v) else 1 for v in values],
        "window_nmse": [_finite(v) for v in nmse.double().cpu().tolist()],
        "missed": missed,
        "misses": [int(m) for m in missed],
        "trials": [int(r) for r in recoverable],
    }
    if config.search == "adversarial":
        e_norm = ctx.operator.norm(e).expand(count) / ctx.operator.norm(y).clamp_min(_TINY)
        rows["relative_perturbation"] = e_norm.double().cpu().tolist()
        # the lesion the search ended with: its mean value on the support and its norm
        on_support = (z != 0).flatten(1).sum(1).clamp_min(1)
        rows["lesion_amplitude"] = (z.flatten(1).sum(1) / on_support).double().cpu().tolist()
        rows["lesion_norm"] = z.flatten(1).norm(dim=1).double().cpu().tolist()
    return {
        "rows": rows,
        "score": _scores(values, visible),
        "lesion": z,
        "out_z": out_z,
        "out": out,
    }


def _scores(values: Sequence[float | None], visible: Sequence[float]) -> list[float]:
    """Panel order, lowest first: ρ/ρ_A⁺ (ρ alone where ρ_A⁺ is 0); NaN ρ is the worst."""
    return [
        -math.inf if rho is None or not math.isfinite(rho) else rho / v if v > 0.0 else rho
        for rho, v in zip(values, visible, strict=True)
    ]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _noise(
    config: FalseNegativeCheck,
    ctx: AuditContext,
    subject: Subject,
    reference: RowSpaceProjector,
    index: int,
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    windows: torch.Tensor,
    seed: int,
    base_subject: Subject | None = None,
) -> dict[str, Any]:
    """The `noise` search; `base_subject` reconstructs the lesion-free references Ψ(y + e)
    (a sampler's average map; default the subject)."""
    count = z.shape[0]
    seeds = [derive_seed(seed, index, "noise", s) for s in range(config.noise_samples)]
    y_norm = ctx.operator.norm(y)
    rhos = torch.empty(count, config.noise_samples, dtype=torch.float64)
    nmses = torch.empty(count, config.noise_samples, dtype=torch.float64)
    worst_out_z, worst_out = [], []
    with torch.no_grad():
        noise = unit_noise(ctx, y.shape[1:], seeds, y_norm.expand(len(seeds)), config.noise_level)
        base = (base_subject or subject).reconstruct(y + noise)  # [S]
        lesion_measurements = ctx.operator.A(z)
        for k in range(count):
            out_z = subject.reconstruct(y + lesion_measurements[k : k + 1] + noise)
            lesion = z[k : k + 1].expand_as(out_z)
            rho = recovery(out_z, base, lesion)
            rhos[k] = rho.double().cpu()
            nmses[k] = window_nmse(out_z, x + lesion, windows[k : k + 1]).double().cpu()
            worst = int(torch.nan_to_num(rho, nan=-math.inf).argmin())
            worst_out_z.append(out_z[worst])
            worst_out.append(base[worst])
    return _trial_rows(
        config, reference, z, rhos, nmses, worst_out_z, worst_out, config.noise_samples
    )


def _search_sampler(
    config: FalseNegativeCheck,
    ctx: AuditContext,
    subject: Subject,
    reference: RowSpaceProjector,
    index: int,
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    windows: torch.Tensor,
    seed: int,
) -> dict[str, Any]:
    """`_search` for a stochastic subject (SAMPLER_MEASURES): every placement judged on single
    draws against the average map without the lesion."""
    settings = config.sampler or DrawSettings()
    averaged = averaged_subject(subject, settings.draws)
    if config.search == "noise":
        return _noise(config, ctx, subject, reference, index, x, y, z, windows, seed, averaged)
    if config.search == "adversarial":
        searched = averaged_subject(
            subject, settings.draws, derive_seed(seed, index, "search"), ctx.device
        )
        z, e = _adversarial(config, ctx, searched, reference, y, z)
    else:
        e = torch.zeros_like(y)
    count, samples = z.shape[0], settings.samples
    with torch.no_grad():
        with same_draws(derive_seed(seed, index, "average"), ctx.device):
            base = averaged.reconstruct(y + e).expand(count, *x.shape)
        draws = single_draws(subject.reconstruct, y + ctx.operator.A(z) + e, samples)
        rhos = torch.stack([recovery(draw, base, z) for draw in draws], 1).double().cpu()
        nmses = torch.stack([window_nmse(draw, x + z, windows) for draw in draws], 1)
        worst = torch.nan_to_num(rhos, nan=-math.inf).argmin(1).tolist()
        worst_out_z = [draws[worst[k], k] for k in range(count)]
        worst_out = [base[k] for k in range(count)]
    return _trial_rows(
        config, reference, z, rhos, nmses.double().cpu(), worst_out_z, worst_out, samples
    )


def _trial_rows(
    config: FalseNegativeCheck,
    reference: RowSpaceProjector,
    z: torch.Tensor,
    rhos: torch.Tensor,
    nmses: torch.Tensor,
    worst_out_z: list[torch.Tensor],
    worst_out: list[torch.Tensor],
    samples: int,
) -> dict[str, Any]:
    """Per-placement rows of `samples` trials each (ρ and the window NMSE [placements, samples],
    float64), and each placement's worst trial for the panels."""
    count = z.shape[0]
    # A⁺ is linear: its recovery of the lesion is the same under every noise draw
    visible = visible_fraction(reference, z).cpu().tolist()
    recoverable = [is_carried(v, config) for v in visible]
    carried = torch.tensor(recoverable, dtype=torch.bool).view(-1, 1)
    bars = config.relative_threshold * torch.tensor(visible, dtype=torch.float64).view(-1, 1)
    finite = torch.isfinite(rhos)
    missed = ~(finite & (rhos >= bars - RECOVERY_TOLERANCE)) & carried
    safe = torch.where(finite, rhos, torch.zeros_like(rhos))
    trials = [samples if r else 0 for r in recoverable]
    rows = {
        "miss_probability": [
            int(missed[k].sum()) / trials[k] if trials[k] else None for k in range(count)
        ],
        "recovery_mean": [
            float(safe[k].sum() / finite[k].sum()) if finite[k].any() else None
            for k in range(count)
        ],
        "recovery_min": [
            float(rhos[k][finite[k]].min()) if finite[k].any() else None for k in range(count)
        ],
        "visible_fraction": visible,
        "recoverable": recoverable,
        "recovery_sum": (safe.sum(1) * carried[:, 0]).tolist(),
        "recovery_count": (finite.sum(1) * carried[:, 0]).tolist(),
        "nonfinite": (~finite).sum(1).tolist(),
        "window_nmse_mean": [_finite(float(nmses[k].mean())) for k in range(count)],
        "misses": missed.sum(1).tolist(),
        "trials": trials,
    }
    rows["relative_recovery_mean"] = [
        relative_recovery(rho, v, r)
        for rho, v, r in zip(rows["recovery_mean"], visible, recoverable, strict=True)
    ]
    rows["relative_recovery_min"] = [
        relative_recovery(rho, v, r)
        for rho, v, r in zip(rows["recovery_min"], visible, recoverable, strict=True)
    ]
    return {
        "rows": rows,
        "score": _scores(rows["recovery_min"], visible),
        "lesion": z,
        "out_z": torch.stack(worst_out_z),
        "out": torch.stack(worst_out),
    }


def _adversarial(
    config: FalseNegativeCheck,
    ctx: AuditContext,
    subject: Subject,
    reference: RowSpaceProjector,
    y: torch.Tensor,
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ρ/ρ_A⁺ over the lesion's pixel values and (δ > 0) a measurement perturbation e;
    returns per placement the lesion and e of the lowest ρ/ρ_A⁺ found among the lesions the
    data carries (ρ_A⁺ ≥ min_visible_fraction; the lowest overall while none is)."""
    operator = ctx.operator
    count = z.shape[0]
    support_mask = (z != 0).to(z.dtype)
    fractions = torch.ones_like(z) * support_mask
    radius = config.measurement_delta * operator.norm(y)  # [1]
    e = torch.zeros(count, *y.shape[1:], device=y.device, dtype=y.dtype)
    best_score = torch.full((count,), math.inf, device=y.device, dtype=torch.float64)
    best_carried = torch.zeros(count, dtype=torch.bool, device=y.device)
    best_z, best_e = z.clone(), e.clone()
    y_all = y.expand(count, *y.shape[1:])
    for _ in range(config.steps):
        fractions = fractions.detach().requires_grad_(True)
        e = e.detach().requires_grad_(config.measurement_delta > 0)
        lesion = z * fractions
        with torch.enable_grad():
            out_z = subject.reconstruct(y_all + operator.A(lesion) + e)
            out = subject.reconstruct(y_all + e)
            rho = recovery(out_z, out, lesion)
            inputs = [fractions, e] if e.requires_grad else [fractions]
            grads = torch.autograd.grad(rho.sum(), inputs)
        subject.counter.backward += 2 * count
        with torch.no_grad():
            # moving weight off the measured pixels lowers ρ by hiding the lesion from the
            # data, which is no miss: the objective is ρ/ρ_A⁺, and a carried lesion beats any
            # lesion that is not
            lesion = lesion.detach()
            flat = lesion.double().flatten(1)
            energy = flat.pow(2).sum(1).clamp_min(_TINY)
            projected = reference(lesion).double().to(y.device)  # A⁺A z
            visible = ((projected.flatten(1) * flat).sum(1) / energy).clamp(0.0, 1.0)
            score = rho.detach().double() / visible.clamp_min(_TINY)
            carried = visible >= config.min_visible_fraction - RECOVERY_TOLERANCE
            lower = score < best_score
            better = torch.where(best_carried, carried & lower, carried | lower)
            best_carried = best_carried | carried
            best_score = torch.where(better, score, best_score)
            best_z = torch.where(better.view(-1, 1, 1, 1), lesion, best_z)
            best_e = torch.where(better.view(-1, *([1] * (e.dim() - 1))), e.detach(), best_e)
            # ∇(ρ/ρ_A⁺) ∝ ∇ρ − (ρ/ρ_A⁺)·∇ρ_A⁺, with ∇_z ρ_A⁺ = 2(A⁺A z − ρ_A⁺ z)/‖z‖² (A⁺A
            # is symmetric) chained through z = z₀ ⊙ fractions; the step takes its sign
            shape = (-1, *([1] * (lesion.dim() - 1)))
            grad_visible = 2.0 * (projected - visible.view(shape) * lesion.double())
            grad_visible = grad_visible / energy.view(shape) * z.double()
            direction = grads[0].double() - score.view(shape) * grad_visible
            fractions = fractions - config.step_size * direction.sign().to(z.dtype) * support_mask
            fractions = fractions.clamp(MIN_LESION_FRACTION, 1.0) * support_mask
            if e.requires_grad:
                step = operator.project(grads[1])
                step = step / operator.norm(step).clamp_min(_TINY).view(-1, *([1] * (e.dim() - 1)))
                e = operator.project(e - config.step_size * radius * step)
                shrink = (radius / operator.norm(e).clamp_min(_TINY)).clamp(max=1.0)
                e = e * shrink.view(-1, *([1] * (e.dim() - 1)))
    return best_z, best_e


def _panels(
    config: FalseNegativeCheck,
    found: dict[str, Any],
    placements: Sequence[Placement],
    x: torch.Tensor,
    index: int,
    complex_image: bool,
) -> list[dict[str, Any]]:
    """Panels of this image's `config.panels` worst placements that were missed."""
    if config.panels == 0:
        return []
    missed = [k for k, m in enumerate(found["rows"]["misses"]) if m]
    missed.sort(key=lambda k: found["score"][k])
    records = []
    for k in missed[: config.panels]:
        lesion = found["lesion"][k]
        outline = (lesion_support(lesion) > 0).numpy()
        out_z = found["out_z"][k]
        out = found["out"][k] if found["out"].shape[0] > 1 else found["out"][0]
        score = found["score"][k]
        p = placements[k]
        rho = found["rows"]["recovery_min"][k]
        shown_rho = "NaN" if rho is None else f"{rho:.3f}"
        caption = f"image {index}, lesion at ({p.row}, {p.col}): ρ = {shown_rho}"
        records.append(
            panel_record(
                score,
                f"{caption}, A⁺: ρ_A⁺ = {found['rows']['visible_fraction'][k]:.3f}"
                f" (ρ/ρ_A⁺ = {score:.3f})",
                [
                    ("x + z", shown(x + lesion, complex_image)),
                    ("Ψ(A(x+z)+e)", shown(out_z, complex_image)),
                    ("Ψ(A(x+z)+e) − Ψ(Ax+e)", shown_difference(out_z - out, complex_image)),
                    ("lesion z", shown_difference(lesion, complex_image)),
                ],
                outline,
                [False, False, True, True],
            )
        )
    return records


def lesion_support(lesion: torch.Tensor) -> torch.Tensor:
    """[H, W]: where a lesion image is non-zero in any channel."""
    return (lesion.detach().abs().sum(0) > 0).float().cpu()
