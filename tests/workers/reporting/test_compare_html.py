"""The HTML page of a comparison: both models on every curve, both worst-case reconstructions
side by side, and the comparison table."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.engine.test_compare_with import SPEC, Blurred, _reference
from tests.engine.tiny_models import Identity, config
from workers.engine.audit import run_audit_with_model
from workers.reporting.html import build_sections, render_html

torch.set_num_threads(1)


def test_comparison_page(tmp_path: Path) -> None:
    cfg = config(
        checks=[{"kind": "worst_case", "levels": [0.05], "steps": 2, "restarts": 1}],
        dataset={"builtin": "ellipses", "count": 1, "size": 16, "seed": 1},
    )
    report = run_audit_with_model(
        Blurred(Identity()),
        SPEC,
        cfg,
        out_dir=tmp_path,
        model_sha256="ab" * 32,
        reference=_reference(Identity()),
    )
    (section,) = build_sections(report, tmp_path)
    titles = [figure.title for figure in section.figures]
    assert "Worst case: network and reference model side by side" in titles
    assert [f.subject for f in section.findings] == ["model", "reference"]
    page = render_html(report, tmp_path)
    assert 'id="comparison"' in page and "worst-case relative error at level 0.05" in page
