"""Image panels for the report: PNG bytes drawn with matplotlib's Agg backend (no display, no
pyplot state, so it is safe in any process). Every panel of a row shares one outline, e.g. the
lesion's support, drawn as a contour."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PANEL_INCHES = 2.2
DPI = 100


def panels_png(
    images: Sequence[tuple[str, np.ndarray]],
    outline: np.ndarray | None = None,
    title: str | None = None,
    signed: Sequence[bool] | None = None,
) -> bytes:
    """One row of 2-D images with their captions; `signed[i]` draws image i on a symmetric
    diverging scale (differences), the others in grey on their own range."""
    signed = signed or [False] * len(images)
    figure = Figure(figsize=(PANEL_INCHES * len(images), PANEL_INCHES + 0.4), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(images), squeeze=False)[0]
    for ax, (caption, image), is_signed in zip(axes, images, signed, strict=True):
        data = np.asarray(image, dtype=np.float64)
        if is_signed:
            bound = float(np.abs(data).max()) or 1.0
            shown = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound)
        else:
            shown = ax.imshow(data, cmap="gray")
        if outline is not None and outline.any():
            ax.contour(outline.astype(np.float64), levels=[0.5], colors="yellow", linewidths=0.8)
        figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(caption, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
