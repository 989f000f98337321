from __future__ import annotations

import pytest
import torch

from schemas.checks_theorem import Lesion, Position
from workers.engine.lesions import (
    candidate_mask,
    explicit_placements,
    lesion_image,
    random_placements,
    support,
)
from workers.shared.errors import EngineInputError


def _connected(pattern: torch.Tensor) -> bool:
    cells = {(int(r), int(c)) for r, c in pattern.nonzero()}
    seen, todo = set(), [next(iter(cells))]
    while todo:
        r, c = todo.pop()
        if (r, c) in seen or (r, c) not in cells:
            continue
        seen.add((r, c))
        todo += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return seen == cells


def test_shapes_have_their_exact_pixel_counts() -> None:
    disk = support(Lesion(shape="disk", size=1), seed=0)
    assert disk.shape == (3, 3) and disk.sum() == 5  # the centre and its 4 neighbours
    assert support(Lesion(shape="disk", size=2), 0).sum() == 13
    assert support(Lesion(shape="square", size=3), 0).sum() == 9


def test_random_walk_has_k_connected_pixels_and_depends_on_the_seed() -> None:
    walks = [support(Lesion(shape="random_walk", size=12), seed) for seed in range(5)]
    for walk in walks:
        assert walk.sum() == 12 and _connected(walk)
    assert torch.equal(walks[0], support(Lesion(shape="random_walk", size=12), 0))
    assert any(not torch.equal(walks[0], w) for w in walks[1:])


def test_text_renders_small() -> None:
    text = support(Lesion(shape="text", size=8, text="AB"), 0)
    assert 0 < text.sum() < text.numel() and text.shape[0] <= 10


def test_random_placements_land_on_foreground_away_from_the_border() -> None:
    image = torch.zeros(1, 32, 32)
    image[:, 4:28, 8:30] = 0.7  # the object; the rest is background
    pattern = support(Lesion(shape="square", size=3), 0)
    warnings: list[str] = []
    placements = random_placements(image, pattern, 20, 3, (0.0, 1.0), False, warnings, 0)
    assert not warnings and len(set(placements)) == 20
    for p in placements:
        assert image[0, p.row : p.row + 3, p.col : p.col + 3].min() > 0
        assert 4 <= p.row <= 32 - 3 - 4 and 4 <= p.col <= 32 - 3 - 4
    again = random_placements(image, pattern, 20, 3, (0.0, 1.0), False, [], 0)
    assert again == placements
    mask = candidate_mask(image, pattern, (0.0, 1.0), False, margin=4)
    assert mask.sum() > 0 and not mask[:4].any()


def test_empty_image_falls_back_with_a_warning() -> None:
    warnings: list[str] = []
    pattern = support(Lesion(shape="disk", size=1), 0)
    placements = random_placements(
        torch.zeros(1, 16, 16), pattern, 2, 0, (0, 1), False, warnings, 7
    )
    assert len(placements) == 2 and "image 7" in warnings[0]


def test_lesion_image_and_explicit_positions() -> None:
    pattern = support(Lesion(shape="square", size=2), 0)
    (placement,) = explicit_placements([Position(row=3, col=5)], pattern, (2, 8, 8))
    z = lesion_image(pattern, placement, (2, 8, 8), 0.25, complex_image=True)
    assert z[0, 3:5, 5:7].eq(0.25).all() and z[0].sum() == pytest.approx(1.0)
    assert z[1].abs().sum() == 0  # complex images: the lesion is real
    with pytest.raises(EngineInputError, match="does not fit"):
        explicit_placements([Position(row=7, col=0)], pattern, (1, 8, 8))
