"""The report's figures as PNG bytes: error-vs-level curves and image panels.

matplotlib's object API on the Agg canvas (no pyplot: no global state, safe in any thread, no
display). Arrays come from the audit's .npy artifacts, loaded without pickles and size-capped.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

MAX_ARRAY_ELEMENTS = 4 * 1024 * 1024  # a panel never needs more; bigger files are skipped
DPI = 96


@dataclass(frozen=True)
class Curve:
    label: str
    levels: list[float]
    values: list[float | None]
    style: str = "-"
    marker: str = "o"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def curves_png(title: str, ylabel: str, curves: list[Curve]) -> bytes | None:
    """Lines of a quantity against the relative perturbation level; None when nothing to plot."""
    drawable = [c for c in curves if any(v is not None and math.isfinite(v) for v in c.values)]
    if not drawable:
        return None
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    levels = [lv for c in drawable for lv in c.levels]
    for curve in drawable:
        points = [
            (lv, v)
            for lv, v in zip(curve.levels, curve.values, strict=True)
            if v is not None and math.isfinite(v)
        ]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, curve.style, marker=curve.marker, label=curve.label)
    if min(levels) > 0 and max(levels) / min(levels) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("relative perturbation level δ")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def load_array(path: Path) -> np.ndarray | None:
    """A .npy artifact as float64, or None if it is missing, pickled, huge or not numeric."""
    try:
        # memory-mapped: only the header is read before the size check
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        return None
    if array.size > MAX_ARRAY_ELEMENTS or not np.issubdtype(array.dtype, np.number):
        return None
    if np.iscomplexobj(array):
        array = np.abs(array)
    return np.nan_to_num(np.asarray(array, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def as_picture(array: np.ndarray) -> np.ndarray:
    """A 2-D picture of an artifact: one channel as is, several (real and imaginary parts,
    colours, coils) as the magnitude over channels; 1-D arrays stay 1-D (drawn as a line)."""
    array = np.squeeze(array)
    if array.ndim <= 2:
        return array
    channels = array.reshape(-1, *array.shape[-2:])
    return np.sqrt(np.sum(channels**2, axis=0))


@dataclass(frozen=True)
class Panel:
    title: str
    array: np.ndarray
    signed: bool = False  # a difference or a perturbation: symmetric colour map around 0


def panels_png(panels: list[Panel]) -> bytes | None:
    if not panels:
        return None
    fig = Figure(figsize=(2.6 * len(panels), 2.9))
    for position, panel in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), position)
        picture = as_picture(panel.array)
        if picture.ndim == 1:
            ax.plot(picture, linewidth=0.8)
            ax.set_box_aspect(1)
        else:
            if panel.signed and picture.min() < 0:
                extent = float(np.abs(picture).max()) or 1.0
                image = ax.imshow(picture, cmap="RdBu_r", vmin=-extent, vmax=extent)
            else:
                image = ax.imshow(picture, cmap="gray" if not panel.signed else "magma")
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(panel.title, fontsize="small")
    return _png(fig)
