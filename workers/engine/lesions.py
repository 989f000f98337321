"""Small details ("lesions") to insert into an image, and where to put them.

A lesion is a 0/1 support pattern (disk, square, a seeded random walk of k connected pixels as
in FNAF, or a short rendered string) scaled by its contrast times the image's value range. It
is placed away from the border and where the image is not background, so that a missed lesion
means a washed-out detail inside the object, not a detail lost in the empty surround."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from schemas.checks_theorem import Lesion, Position
from workers.shared.errors import EngineInputError

# A footprint pixel counts as foreground when its value is this far above the range's low end.
FOREGROUND_FRACTION = 0.05
# Rendered text: a glyph pixel is part of the support from this grey level (of 255) on.
TEXT_LEVEL = 96
_STEPS = ((0, 1), (1, 0), (0, -1), (-1, 0))


@dataclass(frozen=True)
class Placement:
    row: int  # top-left corner of the pattern
    col: int


def support(lesion: Lesion, seed: int) -> torch.Tensor:
    """The lesion's 0/1 pattern [h, w], cropped to its bounding box. Only `random_walk` uses
    the seed."""
    if lesion.shape == "disk":
        r = lesion.size
        grid = torch.arange(-r, r + 1, dtype=torch.float32)
        pattern = (grid.view(-1, 1) ** 2 + grid.view(1, -1) ** 2 <= r * r).float()
    elif lesion.shape == "square":
        pattern = torch.ones(lesion.size, lesion.size)
    elif lesion.shape == "random_walk":
        pattern = _random_walk(lesion.size, seed)
    else:
        pattern = _text(lesion.text, lesion.size)
    return _crop(pattern)


def _random_walk(pixels: int, seed: int) -> torch.Tensor:
    """A walk on the 4-neighbour grid from the centre until `pixels` distinct pixels are
    visited: they are connected by construction."""
    rng = np.random.default_rng(seed)
    visited = {(0, 0)}
    row = col = 0
    while len(visited) < pixels:
        dr, dc = _STEPS[int(rng.integers(4))]
        row, col = row + dr, col + dc
        visited.add((row, col))
    rows = [r for r, _ in visited]
    cols = [c for _, c in visited]
    pattern = torch.zeros(max(rows) - min(rows) + 1, max(cols) - min(cols) + 1)
    for r, c in visited:
        pattern[r - min(rows), c - min(cols)] = 1.0
    return pattern


@lru_cache(maxsize=32)
def _text_array(text: str, height: int) -> np.ndarray:
    # matplotlib ships DejaVu Sans: PIL renders it without any download
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), max(4, height))
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (max(1, int(right)), max(1, int(bottom))))
    ImageDraw.Draw(canvas).text((0, 0), text, fill=255, font=font)
    return (np.asarray(canvas) >= TEXT_LEVEL).astype(np.float32)


def _text(text: str, height: int) -> torch.Tensor:
    pattern = torch.from_numpy(_text_array(text, height).copy())
    if pattern.sum() == 0:
        raise EngineInputError(f"lesion text {text!r} renders to no pixel at size {height}")
    return pattern


def _crop(pattern: torch.Tensor) -> torch.Tensor:
    rows = pattern.sum(1).nonzero().flatten()
    cols = pattern.sum(0).nonzero().flatten()
    return pattern[int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]


def lesion_image(
    pattern: torch.Tensor,
    placement: Placement,
    image_shape: Sequence[int],
    amplitude: float,
    complex_image: bool,
) -> torch.Tensor:
    """z: [C, H, W] zeros with amplitude × pattern at the placement; in every channel of a real
    image, in the real channel only of a complex (real, imaginary) image."""
    channels, height, width = image_shape
    h, w = pattern.shape
    if placement.row + h > height or placement.col + w > width:
        raise EngineInputError(
            f"a lesion of {h}×{w} pixels at ({placement.row}, {placement.col}) does not fit "
            f"in {height}×{width} images"
        )
    z = torch.zeros(tuple(image_shape))
    rows = slice(placement.row, placement.row + h)
    cols = slice(placement.col, placement.col + w)
    for channel in range(1 if complex_image else channels):
        z[channel, rows, cols] = amplitude * pattern
    return z


def magnitude(image: torch.Tensor, complex_image: bool) -> torch.Tensor:
    """[H, W]: |x| of a complex image, the channel mean of a real one."""
    if complex_image:
        return image.pow(2).sum(0).sqrt()
    return image.mean(0)


def candidate_mask(
    image: torch.Tensor,
    pattern: torch.Tensor,
    value_range: tuple[float, float],
    complex_image: bool,
    margin: int,
) -> torch.Tensor:
    """[H - h + 1, W - w + 1] booleans: top-left corners at least `margin` pixels from the
    border whose whole footprint is foreground."""
    lo, hi = value_range
    floor = (0.0 if complex_image else lo) + FOREGROUND_FRACTION * (hi - lo)
    foreground = (magnitude(image, complex_image) > floor).float()
    h, w = pattern.shape
    footprint = (pattern > 0).float()
    # a corner is good when every pattern pixel lands on foreground (a correlation)
    hits = torch.nn.functional.conv2d(foreground[None, None], footprint[None, None])[0, 0]
    ok = hits >= footprint.sum() - 0.5
    valid = torch.zeros_like(ok)
    height, width = image.shape[-2:]
    r_stop, c_stop = height - h - margin + 1, width - w - margin + 1
    if r_stop > margin and c_stop > margin:
        valid[margin:r_stop, margin:c_stop] = True
    return ok & valid


def random_placements(
    image: torch.Tensor,
    pattern: torch.Tensor,
    count: int,
    seed: int,
    value_range: tuple[float, float],
    complex_image: bool,
    warnings: list[str],
    index: int,
) -> list[Placement]:
    """`count` seeded placements (distinct while there are enough candidates) on foreground,
    away from the border; falling back to anywhere inside the margin, with a warning."""
    height, width = image.shape[-2:]
    h, w = pattern.shape
    if h > height or w > width:
        raise EngineInputError(
            f"a lesion of {h}×{w} pixels does not fit in {height}×{width} images"
        )
    margin = max(1, min(height, width) // 8)
    candidates = candidate_mask(image, pattern, value_range, complex_image, margin).nonzero()
    if len(candidates) == 0:
        margin = 0 if h + 2 > height or w + 2 > width else 1
        candidates = candidate_mask(image, pattern, value_range, complex_image, margin).nonzero()
        if len(candidates) == 0:
            everywhere = torch.ones(height - h + 1, width - w + 1, dtype=torch.bool)
            candidates = everywhere.nonzero()
        warnings.append(
            f"image {index}: no foreground placement for the lesion away from the border; "
            "placed anywhere"
        )
    generator = torch.Generator().manual_seed(seed)
    if count <= len(candidates):
        chosen = torch.randperm(len(candidates), generator=generator)[:count]
    else:
        chosen = torch.randint(len(candidates), (count,), generator=generator)
    return [Placement(int(candidates[i, 0]), int(candidates[i, 1])) for i in chosen]


def explicit_placements(
    positions: Sequence[Position], pattern: torch.Tensor, image_shape: Sequence[int]
) -> list[Placement]:
    _, height, width = image_shape
    h, w = pattern.shape
    placements = []
    for p in positions:
        if p.row + h > height or p.col + w > width:
            raise EngineInputError(
                f"lesion position ({p.row}, {p.col}): a {h}×{w} lesion does not fit in "
                f"{height}×{width} images"
            )
        placements.append(Placement(p.row, p.col))
    return placements
