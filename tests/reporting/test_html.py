"""report.html: verdict first, findings, figures as data URIs, provenance, and escaping."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from tests.reporting.sample import make_report, write_report_dir
from workers.reporting.html import render_html, write_report_html

HOSTILE = "<script>alert(1)</script>"


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_sections_figures_and_provenance(tmp_path: Path) -> None:
    report = make_report()
    report["signature"] = {"algorithm": "ed25519", "key_id": "k" * 64, "value": "c2ln"}
    html = write_report_html(write_report_dir(tmp_path, report)).read_text()
    # the verdict comes before any check's details
    assert html.index('id="verdict"') < html.index("What was found") < html.index("c00 ·")
    assert ">fail</span>" in html
    assert "2 failed, 1 passed, 1 informational" in html
    assert "0.9 &gt; bound 0.4" in html  # the worst case's measured value and bound
    # curves for random_noise and worst_case, one panel row for the worst case
    images = _images(html)
    assert len(images) == 3 and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in images)
    assert "Worst case of the network at level 0.05" in html  # the threshold's level
    widths = [int.from_bytes(png[16:20], "big") for png in images]  # PNG IHDR width
    # five panels (original, clean, perturbed, difference, perturbation) side by side
    assert widths[-1] > 1.6 * max(widths[:-1])
    assert "ab" * 32 in html and "k" * 64 in html  # model sha256 and the signing key
    assert "http://" not in html.replace("http://www.w3.org", "")  # self-contained


def test_missing_artifacts_still_render(tmp_path: Path) -> None:
    html = render_html(make_report(), tmp_path)  # no .npy files in tmp_path
    assert len(_images(html)) == 2  # curves only
    assert "none (an unsigned local run)" in html


def test_user_text_is_escaped(tmp_path: Path) -> None:
    report = make_report(model_name=HOSTILE, description='<img src=x onerror="alert(2)">')
    html = render_html(report, tmp_path)
    assert HOSTILE not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert "default-src 'none'" in html  # and a CSP forbids scripts anyway
