"""The built-in `digits` set: labelled images of the characters 0-9, rendered on the fly.

They are drawn from the DejaVu Sans font that ships inside matplotlib (no download, no display):
each glyph's outline is rasterised by point-in-polygon tests on a supersampled grid, after a
seeded random rotation, scale, shift and stroke weight, then blurred slightly and pixel noise is
added. Ten classes, balanced (image i shows digit i mod 10 before a seeded shuffle), values in
[0, 1], the same images for the same (count, size, seed).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from matplotlib.font_manager import FontProperties
from matplotlib.path import Path as GlyphPath
from matplotlib.textpath import TextPath
from scipy.ndimage import gaussian_filter

from schemas.datasets import DIGIT_CLASSES

_SUPERSAMPLE = 4
_FONT = FontProperties(family="DejaVu Sans", weight="bold")


@cache
def _glyph(digit: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The digit's outline polygons, centred on its bounding box and scaled to height 1."""
    path = TextPath((0.0, 0.0), str(digit), size=1.0, prop=_FONT)
    outlines = [np.asarray(poly, dtype=np.float64) for poly in path.to_polygons()]
    polygons = [poly for poly in outlines if len(poly) >= 3]
    points = np.concatenate(polygons)
    low, high = points.min(axis=0), points.max(axis=0)
    centre, height = (low + high) / 2, float(high[1] - low[1])
    return centre, [(poly - centre) / height for poly in polygons]


def _render(digit: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One digit as a [size, size] image in [0, 1]."""
    _, polygons = _glyph(digit)
    fine = size * _SUPERSAMPLE
    # pixel centres in glyph coordinates: the glyph (height 1) fills `scale` of the image
    scale = rng.uniform(0.55, 0.8)
    angle = rng.uniform(-0.3, 0.3)
    shift = rng.uniform(-0.1, 0.1, size=2)
    axis = (np.arange(fine) + 0.5) / fine - 0.5
    gx, gy = np.meshgrid(axis, -axis, indexing="xy")  # y up, as in the font
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * (gx - shift[0]) + sin * (gy - shift[1])) / scale
    v = (-sin * (gx - shift[0]) + cos * (gy - shift[1])) / scale
    points = np.stack([u.ravel(), v.ravel()], axis=1)
    # even-odd rule over all outlines: the holes of 0, 4, 6, 8, 9 stay empty
    inside = np.zeros(points.shape[0], dtype=bool)
    for poly in polygons:
        inside ^= GlyphPath(poly).contains_points(points)
    mask = inside.reshape(fine, fine).astype(np.float64)
    image = mask.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    image = gaussian_filter(image, sigma=rng.uniform(0.0, 0.6))
    image = image * rng.uniform(0.7, 1.0) + rng.normal(0.0, 0.03, size=image.shape)
    return np.clip(image, 0.0, 1.0)


def digits(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` seeded digit images [N, 1, size, size] in [0, 1] and their labels [N] (int64)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % DIGIT_CLASSES)
    images = np.stack([_render(int(label), size, rng) for label in labels])[:, None]
    return (
        torch.from_numpy(images.astype(np.float32)),
        torch.from_numpy(labels.astype(np.int64)),
    )
