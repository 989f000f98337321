"""The report's figures are drawn once and cropped as savefig(bbox_inches="tight") crops them."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from workers.reporting.figures import BudgetPoint, Curve, budget_png, curves_png
from workers.shared.panels import Panel, panels_figure, tight_png


def _size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size


def _savefig_tight(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return buffer.getvalue()


@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the figure draws (savefig's layout pass included)."""
    counted: list[int] = []
    draw = Figure.draw

    def counting(self: Figure, renderer: Any) -> None:
        counted.append(1)
        draw(self, renderer)

    monkeypatch.setattr(Figure, "draw", counting)
    return counted


def test_a_figure_is_drawn_once_and_cropped_as_savefig_crops_it(draws: list[int]) -> None:
    rng = np.random.default_rng(0)
    panels = [Panel("original x", rng.random((32, 32))), Panel("e", rng.random((32, 32)), True)]
    figure = panels_figure(panels, title="a title")
    assert figure is not None
    png = tight_png(figure)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(draws) == 1
    expected = _size(_savefig_tight(figure))
    width, height = _size(png)
    assert abs(width - expected[0]) <= 2 and abs(height - expected[1]) <= 2


def test_content_past_the_canvas_is_saved_by_savefig(draws: list[int]) -> None:
    figure = Figure(figsize=(2.0, 1.0))
    figure.add_subplot().set_xlabel("a label far below", labelpad=60)
    png = tight_png(figure)
    assert len(draws) == 3  # the first draw, then savefig's two
    assert _size(png) == _size(_savefig_tight(figure))


def test_plots_have_room_for_their_labels_on_the_canvas(draws: list[int]) -> None:
    curves = [Curve("network", [0.01, 0.1, 1.0], [0.001, 123456.0, 7.5])]
    assert curves_png("title", "a long quantity (units)", curves) is not None
    assert budget_png([BudgetPoint(0.05, 1200, 0.3), BudgetPoint(0.1, 250000, 0.9)]) is not None
    assert len(draws) == 2  # one each
