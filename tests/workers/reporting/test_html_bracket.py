"""report.html of a worst_case check with `certify`: the bracket table, the band on the
error-vs-level curve, and `proven` counted as a pass."""

from __future__ import annotations

import re
from pathlib import Path

from tests.service.reports.bracket_sample import certified_report
from tests.service.reports.sample import make_report, write_report_dir
from workers.reporting.html import build_sections, render_html


def _worst_case_section(report: dict, directory: Path):
    (section,) = [s for s in build_sections(report, directory) if s.kind == "worst_case"]
    return section


def test_the_bracket_is_tabled_and_drawn(tmp_path: Path) -> None:
    report = certified_report(3.0)
    directory = write_report_dir(tmp_path, report)
    section = _worst_case_section(report, directory)
    (bracket,) = [t for t in section.tables if "certified bracket" in t["title"]]
    assert [row["level"] for row in bracket["rows"]] == ["0.01", "0.05"]
    assert bracket["rows"][1]["cells"][:3] == ["1", "2.93", "2.93"]
    assert bracket["rows"][1]["cells"][5] == "proven"
    (curve,) = [f for f in section.figures if f.title == "Error against perturbation level"]
    assert "certified upper bound" in curve.caption
    # the same curve without the band is a different picture
    plain = _worst_case_section(make_report(), directory)
    (plain_curve,) = [f for f in plain.figures if f.title == "Error against perturbation level"]
    assert plain_curve.data_uri != curve.data_uri and "certified" not in plain_curve.caption
    html = render_html(report, directory)
    assert 'class="tag v-proven">proven<' in html
    assert re.search(r"1 failed, 2 passed \(1 proven by certified bounds\)", html)


def test_an_unproven_bracket_says_so(tmp_path: Path) -> None:
    report = certified_report(2.0)
    directory = write_report_dir(tmp_path, report)
    html = render_html(report, directory)
    assert "not proven" in html and "proof: unproven" in html


def test_a_report_without_certify_has_no_bracket(tmp_path: Path) -> None:
    report = make_report()
    html = render_html(report, write_report_dir(tmp_path, report))
    assert "bracket" not in html and "proof:" not in html and "proven by" not in html
