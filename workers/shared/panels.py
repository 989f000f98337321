"""Rows of image panels as PNG bytes: the theorem checks' panels (drawn in the engine) and the
worst-case panels of report.html (workers.reporting) both come from `panels_figure`.

matplotlib's object API on the Agg canvas (no pyplot state, no display: safe in any process and
thread). numpy and matplotlib only, no torch: the report side imports it too.

`tight_png` is the report's PNG of a figure: cropped to what is drawn, as
`savefig(bbox_inches="tight")` crops it, but drawn once where savefig draws twice (once to
measure, once to render); a figure whose content reaches past its canvas is saved by savefig.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import image as mimage
from matplotlib import rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
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


def tight_png(figure: Figure, dpi: float = DPI) -> bytes:
    """The figure as PNG, cropped to its drawn content plus savefig's pad (`savefig.pad_inches`,
    the figure's background where it reaches past the canvas): the picture
    `savefig(bbox_inches="tight")` gives (up to a pixel at the edges) from one draw instead of
    two. Content past the canvas (a label below its bottom edge) is not drawn on it: such a
    figure is saved by savefig, which makes room for it."""
    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    content = figure.get_tightbbox(canvas.get_renderer())
    width, height = canvas.get_width_height()
    buffer = io.BytesIO()
    if content.x0 < 0 or content.y0 < 0 or content.x1 * dpi > width or content.y1 * dpi > height:
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        return buffer.getvalue()
    box = content.padded(rcParams["savefig.pad_inches"])
    left, right = math.floor(box.x0 * dpi), math.ceil(box.x1 * dpi)
    top, bottom = math.floor(height - box.y1 * dpi), math.ceil(height - box.y0 * dpi)
    # the pad may reach past the canvas: there the picture is the figure's background
    background = np.round(np.asarray(to_rgba(figure.get_facecolor())) * 255).astype(np.uint8)
    pixels = np.empty((bottom - top, right - left, 4), dtype=np.uint8)
    pixels[:] = background
    drawn = np.asarray(canvas.buffer_rgba())
    y0, y1 = max(top, 0), min(bottom, height)
    x0, x1 = max(left, 0), min(right, width)
    pixels[y0 - top : y1 - top, x0 - left : x1 - left] = drawn[y0:y1, x0:x1]
    mimage.imsave(buffer, pixels, format="png", dpi=dpi)  # as savefig writes its PNG
    return buffer.getvalue()


def panels_png(
    panels: Sequence[Panel], outline: np.ndarray | None = None, title: str | None = None
) -> bytes | None:
    """`panels_figure` as PNG (savefig, cropped to its content), or None without a panel: the
    theorem checks' artifacts, whose bytes stay those of earlier versions."""
    figure = panels_figure(panels, outline, title)
    if figure is None:
        return None
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def panels_figure(
    panels: Sequence[Panel], outline: np.ndarray | None = None, title: str | None = None
) -> Figure | None:
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
    return figure
