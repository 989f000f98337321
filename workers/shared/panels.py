"""Rows of image panels as PNG bytes: the theorem checks' panels (drawn in the engine) and the
worst-case panels of report.html (workers.reporting) both come from `panels_png`.

matplotlib's object API on the Agg canvas (no pyplot state, no display: safe in any process and
thread). numpy and matplotlib only, no torch: the report side imports it too.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

PANEL_INCHES = 2.6
DPI = 96


@dataclass(frozen=True)
class Panel:
    title: str
    array: np.ndarray
    signed: bool = False  # a difference or a perturbation: symmetric colour map around 0


def as_picture(array: np.ndarray) -> np.ndarray:
    """A 2-D picture of an array: one channel as is, several (real and imaginary parts, colours,
    coils) as the magnitude over channels; 1-D arrays stay 1-D (drawn as a line)."""
    array = np.squeeze(np.asarray(array, dtype=np.float64))
    if array.ndim <= 2:
        return array
    channels = array.reshape(-1, *array.shape[-2:])
    return np.sqrt(np.sum(channels**2, axis=0))


def panels_png(
    panels: Sequence[Panel], outline: np.ndarray | None = None, title: str | None = None
) -> bytes | None:
    """One row of panels with their captions, or None when there is none. A signed panel is
    drawn on a symmetric diverging scale, the others in grey on their own range; `outline` (a
    mask of the panels' shape, e.g. a lesion's support) is drawn on every 2-D panel."""
    if not panels:
        return None
    figure = Figure(figsize=(PANEL_INCHES * len(panels), PANEL_INCHES + (0.6 if title else 0.3)))
    for position, panel in enumerate(panels, start=1):
        ax = figure.add_subplot(1, len(panels), position)
        picture = as_picture(panel.array)
        if picture.ndim == 1:
            ax.plot(picture, linewidth=0.8)
            ax.set_box_aspect(1)
        else:
            if panel.signed:
                bound = float(np.abs(picture).max()) or 1.0
                image = ax.imshow(picture, cmap="RdBu_r", vmin=-bound, vmax=bound)
            else:
                image = ax.imshow(picture, cmap="gray")
            if outline is not None and outline.any() and outline.shape == picture.shape:
                ax.contour(
                    outline.astype(np.float64), levels=[0.5], colors="yellow", linewidths=0.8
                )
            ax.set_xticks([])
            ax.set_yticks([])
            figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(panel.title, fontsize="small")
    if title:
        figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()
