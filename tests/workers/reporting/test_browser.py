"""The HTML report in a real headless Chromium: it renders, logs no console error, every figure
loads, and a hostile model name stays text."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.reports import signatures as signing
from tests.service.reports.chromium import visit
from tests.service.reports.sample import make_report, write_report_dir
from workers.reporting.html import write_report_html

pytestmark = pytest.mark.needs("chromium")

PROBE = """JSON.stringify({
  images: Array.from(document.images).map(i => [i.complete, i.naturalWidth]),
  title: document.querySelector('#model-name').textContent,
  scripts: document.scripts.length,
  verdict: document.querySelector('#verdict').textContent,
})"""


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    import json

    key = signing.load_or_create_private_key(tmp_path / "key.pem")
    report = signing.sign_report(make_report(model_name="<script>alert(1)</script>"), key)
    page = write_report_html(write_report_dir(tmp_path / "report", report))
    seen = visit(page, PROBE, tmp_path / "profile")
    assert seen.errors == []
    result = json.loads(seen.value)
    assert len(result["images"]) == 3
    assert all(complete and width > 0 for complete, width in result["images"])
    assert result["title"] == "<script>alert(1)</script>" and result["scripts"] == 0
    assert result["verdict"] == "fail"
