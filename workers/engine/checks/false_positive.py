"""`false_positive`: can a small measurement perturbation ‖e‖ ≤ δ‖y‖ make a detail appear where
the image has none? (adversarial-mri; troublesome_kernel.)

Per image, the window is the `window`×`window` square of least variance of x away from the
border (no detail there). The worst-case search of workers.engine.attacks maximises the energy
‖W(Ψ(y+e) − Ψ(y))‖² inside it: it is the search's `reconstruction` target applied to the
windowed subject y ↦ W·Ψ(y), so no new optimiser is needed. Reported: the spurious contrast
max |Ψ(y+e) − Ψ(y)| inside the window, relative to the value range (magnitudes for complex
images), and its RMS."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from schemas.checks_theorem import FalsePositiveCheck
from schemas.sampler import HallucinationSettings
from schemas.verdicts import compare, judge
from workers.engine.attacks import SearchSettings, ThreatModel, worst_case_search
from workers.engine.checks.theorem_common import (
    is_complex,
    panel_record,
    shown,
    shown_difference,
    value_span,
    worst_panels,
)
from workers.engine.context import ARTIFACT_FILES_KEY, AuditContext, Subject
from workers.engine.lesions import magnitude
from workers.engine.sampling import (
    averaged_subject,
    compare_estimate,
    probability,
    replicate_statistics,
    same_draws,
    single_draws,
    summary_errors,
)
from workers.engine.shards import derive_seed

# What the check measures for a stochastic model (the result's `sampler.measures`).
SAMPLER_MEASURES = (
    "the average map Ψ̄(y) = EΨ(y) and the sampler's single draws: the search ascends the window's "
    "energy of an average of `draws` calls (the same draws at every step); the spurious contrast "
    "of the perturbation found, Ψ̄(y+e) − Ψ̄(y) in the window, is re-evaluated on `replicates` "
    "fresh averages (both from the same draws), `spurious_contrast` their mean and "
    "`standard_error` its standard error; `hallucination` counts, over `samples` separate calls "
    "per image at y and at y + e, the draws whose max |Ψ(y) − x| in the window (where the image "
    "has no structure) exceeds `contrast` of the value range (a NaN output counts), with "
    "Clopper–Pearson 95 % intervals over images × draws"
)


def flattest_window(image: torch.Tensor, side: int, complex_image: bool) -> tuple[int, int]:
    """Top-left corner of the side×side window of least variance of the image (its magnitude),
    at least side // 2 pixels (when the image allows) from the border."""
    plane = magnitude(image, complex_image)[None, None]
    height, width = plane.shape[-2:]
    side = min(side, height, width)
    mean = torch.nn.functional.avg_pool2d(plane, side, stride=1)[0, 0]
    square = torch.nn.functional.avg_pool2d(plane**2, side, stride=1)[0, 0]
    variance = (square - mean**2).clamp_min(0.0)
    margin = side // 2 if height - side - 2 * (side // 2) >= 0 else 0
    margin = margin if width - side - 2 * margin >= 0 else 0
    inner = variance[margin : variance.shape[0] - margin, margin : variance.shape[1] - margin]
    flat = int(inner.flatten().argmin())
    return flat // inner.shape[1] + margin, flat % inner.shape[1] + margin


def _windowed(subject: Subject, windows: torch.Tensor) -> Subject:
    """y ↦ W·Ψ(y); the search batches restarts as restart * B + image."""

    def reconstruct(y: torch.Tensor) -> torch.Tensor:
        out = subject.reconstruct(y)
        return out * windows.repeat(out.shape[0] // windows.shape[0], 1, 1, 1)

    return Subject(name=subject.name, reconstruct=reconstruct, counter=subject.counter)


class FalsePositive:
    kind = "false_positive"

    def run(
        self,
        config: FalsePositiveCheck,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]:
        complex_image = is_complex(ctx)
        x = ctx.images[list(indices)]
        side = min(config.window, *x.shape[-2:])
        corners = [flattest_window(image, side, complex_image) for image in x]
        windows = torch.zeros_like(x)
        for k, (row, col) in enumerate(corners):
            windows[k, :, row : row + side, col : col + side] = 1.0
        y = ctx.measurements(indices)
        # the threat model: the ball ‖e‖ ≤ δ‖y‖, the windowed change of the reconstruction
        threat = ThreatModel(
            levels=(config.delta,),
            space="measurement",
            target="reconstruction",
            formulation="ball",
        )
        # the ℓ2 ascent (pgd), as the kernel's confirmation: it follows the window's energy
        # gradient rather than Adam's per-entry rescaling of it, and is exact on linear Ψ
        search = config.search_settings()
        settings = SearchSettings(
            optimizer="pgd",
            steps=search.steps,
            restarts=search.restarts,
            step_size=search.step_size,
            early_stop_tolerance=0.0,
        )
        if subject.stochastic:
            return _run_on_sampler(
                config, ctx, subject, indices, seed, x, y, windows, corners, threat, settings
            )
        e = _search(ctx, subject, indices, seed, x, y, windows, threat, settings)
        span = value_span(ctx)
        with torch.no_grad():
            clean = subject.reconstruct(y)
            attacked = subject.reconstruct(y + e)
            change = attacked - clean
            inside = magnitude_batch(change, complex_image) * windows[:, 0]
            peak = inside.flatten(1).abs().amax(1) / span
            rms = inside.flatten(1).pow(2).sum(1).div(side * side).sqrt() / span
            relative = ctx.operator.norm(e) / ctx.operator.norm(y).clamp_min(1e-12)
        return _rows_and_panels(
            config, indices, corners, windows, complex_image, peak, rms, relative, clean, attacked
        )

    def merge(self, config: FalsePositiveCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for shard in shards for row in shard["rows"]]
        finite = [r for r in rows if r["spurious_contrast"] == r["spurious_contrast"]]
        warnings = []
        if len(finite) < len(rows):
            warnings.append("the model returned NaN values under a bounded perturbation")
        worst = max(finite, key=lambda r: r["spurious_contrast"], default=None)
        contrasts = [r["spurious_contrast"] for r in finite]
        result: dict[str, Any] = {
            "delta": config.delta,
            "window": config.window,
            "images": len(rows),
            "spurious_contrast": {
                "mean": sum(contrasts) / len(contrasts) if contrasts else None,
                "max": max(contrasts, default=None),
            },
            "worst_image": None
            if worst is None
            else {"index": worst["index"], "spurious_contrast": worst["spurious_contrast"]},
            "per_image": rows,
        }
        sampler = shards[0].get("sampler") if shards else None
        if sampler is not None:  # a stochastic subject (SAMPLER_MEASURES)
            result["standard_error"] = {
                "spurious_contrast": summary_errors(
                    contrasts, [r["standard_error"] for r in finite], ("mean", "max")
                )
            }
            result["hallucination"] = _hallucination(sampler, rows)
            result["sampler"] = {**sampler, "measures": SAMPLER_MEASURES}
        comparisons = []
        threshold = config.threshold
        if threshold is not None and threshold.max_spurious_contrast is not None:
            bound = threshold.max_spurious_contrast
            largest = max(contrasts, default=None)
            if sampler is None:
                comparisons.append(compare("largest spurious contrast", largest, bound))
            else:  # the average map's estimate: judged on its interval's upper end
                comparison, warning = compare_estimate(
                    "largest spurious contrast",
                    largest,
                    result["standard_error"]["spurious_contrast"]["max"],
                    int(sampler["replicates"]),
                    bound,
                )
                comparisons.append(comparison)
                if warning is not None:
                    warnings.append(warning)
        # a deterministic model has no hallucination probability (it hallucinates or not)
        bound_probability = None if threshold is None else threshold.max_hallucination_probability
        if bound_probability is not None and sampler is not None:
            comparisons.append(
                compare(
                    "hallucination probability under the perturbation (upper 95 % bound)",
                    result["hallucination"]["attacked"]["ci_high"],
                    bound_probability,
                )
            )
        if threshold is not None and len(finite) < len(rows):
            # NaN under a bounded perturbation: no bound holds
            comparisons.append(
                compare("images whose reconstruction was NaN", len(rows) - len(finite), 0)
            )
        judge(result, comparisons)
        result["warnings"] = warnings
        result[ARTIFACT_FILES_KEY] = worst_panels(
            shards, config.panels, "false_positive", lowest=False
        )
        return result


def _hallucination(sampler: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The hallucination probabilities over images × draws, at y and at y + e."""
    samples = int(sampler["samples"])
    trials = samples * len(rows)
    return {
        "contrast": sampler["contrast"],
        "samples_per_image": samples,
        "clean": probability(sum(r["hallucinations"]["clean"] for r in rows), trials),
        "attacked": probability(sum(r["hallucinations"]["attacked"] for r in rows), trials),
    }


def _run_on_sampler(
    config: FalsePositiveCheck,
    ctx: AuditContext,
    subject: Subject,
    indices: Sequence[int],
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
    windows: torch.Tensor,
    corners: list[tuple[int, int]],
    threat: ThreatModel,
    settings: SearchSettings,
) -> dict[str, Any]:
    """`run` for a stochastic subject (SAMPLER_MEASURES)."""
    sampler = config.sampler or HallucinationSettings()
    complex_image = is_complex(ctx)
    span = value_span(ctx)
    side = min(config.window, *x.shape[-2:])
    batch_key = (int(indices[0]), len(indices))
    searched = averaged_subject(
        subject, sampler.draws, derive_seed(seed, batch_key, "search"), ctx.device
    )
    e = _search(ctx, searched, indices, seed, x, y, windows, threat, settings)
    averaged = averaged_subject(subject, sampler.draws)
    peaks, energies = [], []
    with torch.no_grad():
        for replicate in range(sampler.replicates):
            draw = derive_seed(seed, batch_key, "replicate", replicate)
            with same_draws(draw, ctx.device):
                clean = averaged.reconstruct(y)
            with same_draws(draw, ctx.device):
                attacked = averaged.reconstruct(y + e)
            if replicate == 0:
                shown_clean, shown_attacked = clean, attacked
            inside = magnitude_batch(attacked - clean, complex_image) * windows[:, 0]
            peaks.append(inside.flatten(1).abs().amax(1) / span)
            energies.append(inside.flatten(1).pow(2).sum(1).div(side * side).sqrt() / span)
        peak, peak_error = replicate_statistics(torch.stack(peaks))
        rms, _ = replicate_statistics(torch.stack(energies))
        relative = ctx.operator.norm(e) / ctx.operator.norm(y).clamp_min(1e-12)
        counts = {
            where: _hallucinated(
                single_draws(subject.reconstruct, shifted, sampler.samples),
                x,
                windows,
                span,
                sampler.contrast,
                complex_image,
            )
            for where, shifted in (("clean", y), ("attacked", y + e))
        }
    found = _rows_and_panels(
        config,
        indices,
        corners,
        windows,
        complex_image,
        peak,
        rms,
        relative,
        shown_clean,
        shown_attacked,
        extra=[
            {
                "standard_error": float(peak_error[k]),
                "hallucinations": {where: int(c[k]) for where, c in counts.items()},
            }
            for k in range(len(indices))
        ],
        averaged_over=sampler.draws,
    )
    return {
        **found,
        "sampler": {
            "draws": sampler.draws,
            "replicates": sampler.replicates,
            "samples": sampler.samples,
            "contrast": sampler.contrast,
        },
    }


def _search(
    ctx: AuditContext,
    subject: Subject,
    indices: Sequence[int],
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
    windows: torch.Tensor,
    threat: ThreatModel,
    settings: SearchSettings,
) -> torch.Tensor:
    """The perturbation that most raises the windowed change of `subject`'s reconstruction."""
    (outcome,) = worst_case_search(
        _windowed(subject, windows),
        ctx.operator,
        y,
        x,
        threat,
        settings,
        seeds=[derive_seed(seed, index, "false_positive") for index in indices],
        should_stop=ctx.should_stop,
    )
    return outcome.perturbation


def _rows_and_panels(
    config: FalsePositiveCheck,
    indices: Sequence[int],
    corners: list[tuple[int, int]],
    windows: torch.Tensor,
    complex_image: bool,
    peak: torch.Tensor,
    rms: torch.Tensor,
    relative: torch.Tensor,
    clean: torch.Tensor,
    attacked: torch.Tensor,
    extra: list[dict[str, Any]] | None = None,
    averaged_over: int | None = None,
) -> dict[str, Any]:
    """One row per image (with `extra`'s fields, a sampler's), and the image panels of the
    largest spurious contrasts (of `averaged_over`-draw averages, for a sampler)."""
    mark = "Ψ" if averaged_over is None else "Ψ̄"
    rows, panels = [], []
    for k, index in enumerate(indices):
        row, col = corners[k]
        contrast = float(peak[k])
        rows.append(
            {
                "index": int(index),
                "row": row,
                "col": col,
                "spurious_contrast": contrast,
                **({} if extra is None else {"standard_error": extra[k]["standard_error"]}),
                "window_rms_contrast": float(rms[k]),
                "relative_perturbation": float(relative[k]),
                **({} if extra is None else {"hallucinations": extra[k]["hallucinations"]}),
            }
        )
        if config.panels:
            change = attacked[k] - clean[k]
            caption = f"image {index}: spurious contrast {contrast:.3f} in the window"
            if averaged_over is not None:
                caption += f" (averages of {averaged_over} draws)"
            panels.append(
                panel_record(
                    contrast,
                    caption,
                    [
                        (f"{mark}(y)", shown(clean[k], complex_image)),
                        (f"{mark}(y+e)", shown(attacked[k], complex_image)),
                        (f"{mark}(y+e) − {mark}(y)", shown_difference(change, complex_image)),
                    ],
                    windows[k, 0].bool().cpu().numpy(),
                    [False, False, True],
                )
            )
    panels.sort(key=lambda p: -p["score"])
    return {"rows": rows, "panels": panels[: config.panels]}


def _hallucinated(
    draws: torch.Tensor,
    x: torch.Tensor,
    windows: torch.Tensor,
    span: float,
    contrast: float,
    complex_image: bool,
) -> list[int]:
    """Per image, the draws [S, B, ...] whose max |Ψ(y) − x| in the window exceeds `contrast`
    of the value range (NaN counts: it is not below)."""
    samples = draws.shape[0]
    difference = (draws - x.unsqueeze(0)).flatten(0, 1)  # [S·B, C, H, W]
    inside = magnitude_batch(difference, complex_image) * windows[:, 0].repeat(samples, 1, 1)
    peak = inside.flatten(1).abs().amax(1) / span
    above = ~(peak <= contrast)
    return above.view(samples, -1).sum(0).tolist()


def magnitude_batch(change: torch.Tensor, complex_image: bool) -> torch.Tensor:
    """[B, H, W]: the change's magnitude (complex) or channel mean (real, signed)."""
    if complex_image:
        return change.pow(2).sum(1).sqrt()
    return change.mean(1)
