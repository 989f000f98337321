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
from workers.engine.shards import derive_seed


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
        e = outcome.perturbation
        span = value_span(ctx)
        with torch.no_grad():
            clean = subject.reconstruct(y)
            attacked = subject.reconstruct(y + e)
            change = attacked - clean
            inside = magnitude_batch(change, complex_image) * windows[:, 0]
            peak = inside.flatten(1).abs().amax(1) / span
            rms = inside.flatten(1).pow(2).sum(1).div(side * side).sqrt() / span
            relative = ctx.operator.norm(e) / ctx.operator.norm(y).clamp_min(1e-12)
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
                    "window_rms_contrast": float(rms[k]),
                    "relative_perturbation": float(relative[k]),
                }
            )
            if config.panels:
                outline = windows[k, 0].bool().cpu().numpy()
                panels.append(
                    panel_record(
                        contrast,
                        f"image {index}: spurious contrast {contrast:.3f} in the window",
                        [
                            ("Ψ(y)", shown(clean[k], complex_image)),
                            ("Ψ(y+e)", shown(attacked[k], complex_image)),
                            ("Ψ(y+e) − Ψ(y)", shown_difference(change[k], complex_image)),
                        ],
                        outline,
                        [False, False, True],
                    )
                )
        panels.sort(key=lambda p: -p["score"])
        return {"rows": rows, "panels": panels[: config.panels]}

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
        comparisons = []
        if config.threshold is not None:
            bound = config.threshold.max_spurious_contrast
            largest = max(contrasts, default=None)
            comparisons.append(compare("largest spurious contrast", largest, bound))
            if len(finite) < len(rows):  # NaN under a bounded perturbation: no bound holds
                comparisons.append(
                    compare("images whose reconstruction was NaN", len(rows) - len(finite), 0)
                )
        judge(result, comparisons)
        result["warnings"] = warnings
        result[ARTIFACT_FILES_KEY] = worst_panels(
            shards, config.panels, "false_positive", lowest=False
        )
        return result


def magnitude_batch(change: torch.Tensor, complex_image: bool) -> torch.Tensor:
    """[B, H, W]: the change's magnitude (complex) or channel mean (real, signed)."""
    if complex_image:
        return change.pow(2).sum(1).sqrt()
    return change.mean(1)
