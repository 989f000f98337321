"""report.html: verdict first, findings, figures as data URIs, provenance, and escaping."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from tests.service.reports.sample import make_report, write_report_dir
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
    # the worst-case table names the search that found each level's worst case, and its steps
    assert "worst found by" in html and '<td class="num">pgd</td>' in html and "steps (max)" in html
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


def test_classifier_levels_are_tabled_by_accuracy_and_epsilon(tmp_path: Path) -> None:
    from workers.reporting.html import build_sections

    noise = {"kind": "random_noise", "levels": [0.1], "samples": 4}
    attack = {"kind": "adversarial", "norm": "linf", "epsilons": [0.01, 0.05]}
    report = {
        "verdict": "info",
        "model": {"name": "classifier", "sha256": "ab" * 32},
        "config": {"checks": [attack, noise]},
        "checks": [
            {
                "kind": "adversarial",
                "subject": "model",
                "verdict": "info",
                "levels": [
                    {
                        "epsilon": 0.01,
                        "robust_accuracy": 0.75,
                        "robust": 3,
                        "robust_accuracy_ci": {"low": 0.19, "high": 0.99},
                    },
                    {
                        "epsilon": 0.05,
                        "robust_accuracy": 0.25,
                        "robust": 1,
                        "robust_accuracy_ci": {"low": 0.006, "high": 0.81},
                    },
                ],
            },
            {
                "kind": "random_noise",
                "subject": "model",
                "verdict": "info",
                "task": "classification",
                "levels": [
                    {
                        "level": 0.1,
                        "accuracy": 0.5,
                        "failures": 8,
                        "trials": 16,
                        "failure_probability": {"estimate": 0.5, "ci_low": 0.25, "ci_high": 0.75},
                        "flip_probability": {"estimate": 0.25, "ci_low": 0.07, "ci_high": 0.52},
                    },
                ],
            },
        ],
    }
    adversarial, noisy = build_sections(report, tmp_path)
    (table,) = adversarial.tables
    assert table["level_header"] == "ε"
    assert [row["level"] for row in table["rows"]] == ["0.01", "0.05"]
    assert table["rows"][1]["cells"][:2] == ["0.25", "0.006"]
    (table,) = noisy.tables
    assert table["headers"][0] == "accuracy" and table["rows"][0]["cells"] == [
        "0.5",
        "0.5",
        "0.75",
        "0.25",
    ]


def test_comparisons_are_shown_as_the_check_wrote_them(tmp_path: Path) -> None:
    report = make_report()
    (comparison,) = report["checks"][2]["comparisons"]
    comparison["quantity"] = "worst-case relative error at the audited level"
    html = render_html(report, tmp_path)
    assert "worst-case relative error at the audited level: 0.9 &gt; bound 0.4" in html
