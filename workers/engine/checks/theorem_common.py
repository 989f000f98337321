"""Small pieces the theorem checks share (false_negative, false_positive, kernel, more_samples):
image conventions, panels carried through JSON shard results, and summaries."""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from workers.engine.context import AuditContext
from workers.engine.lesions import magnitude
from workers.shared.panels import Panel, panels_png


def is_complex(ctx: AuditContext) -> bool:
    """Complex images are (real, imaginary) channels of the MRI operator (as in metrics)."""
    return ctx.images.shape[1] == 2 and ctx.operator.kind == "mri"


def value_span(ctx: AuditContext) -> float:
    lo, hi = ctx.value_range
    return float(hi - lo)


def shown(image: torch.Tensor, complex_image: bool) -> np.ndarray:
    """[C, H, W] → the 2-D array a panel shows (magnitude or channel mean)."""
    return magnitude(image.detach().float().cpu(), complex_image).numpy()


def shown_difference(image: torch.Tensor, complex_image: bool) -> np.ndarray:
    """A signed 2-D difference: the real channel of a complex image, the channel mean else."""
    data = image.detach().float().cpu()
    return (data[0] if complex_image else data.mean(0)).numpy()


def panel_record(
    score: float,
    caption: str,
    images: Sequence[tuple[str, np.ndarray]],
    outline: np.ndarray | None,
    signed: Sequence[bool],
) -> dict[str, Any]:
    """A rendered panel with the score it is ranked by, JSON-able (shard results are stored)."""
    rows = [Panel(title, image, sign) for (title, image), sign in zip(images, signed, strict=True)]
    png = panels_png(rows, outline, caption)
    if png is None:
        raise ValueError("a panel record needs at least one image")
    return {"score": score, "caption": caption, "png": base64.b64encode(png).decode("ascii")}


def worst_panels(
    shards: Sequence[dict[str, Any]], count: int, prefix: str, lowest: bool = True
) -> dict[str, bytes]:
    """The `count` panels with the lowest (or highest) score over all shards, as artifact files."""
    panels = [p for shard in shards for p in shard.get("panels", [])]
    panels.sort(key=lambda p: p["score"], reverse=not lowest)
    return {
        f"{prefix}-{rank}.png": base64.b64decode(p["png"]) for rank, p in enumerate(panels[:count])
    }


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
