"""report.html of an endpoint model's query-only audit (`queries`): the statement near the top,
the Queries section (table, latency, failures by cause) and the figure "what the budget
bought"; a report without `queries` has none of it."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from tests.service.reports.query_sample import BUDGET, URL, make_query_report
from tests.service.reports.sample import make_report, write_report_dir
from workers.reporting.figures import BudgetPoint
from workers.reporting.html import budget_points, queries_section, render_html

HOSTILE = "<script>alert(1)</script>"


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))


def test_the_query_only_audit_is_stated_tabled_and_drawn(tmp_path: Path) -> None:
    report = make_query_report()
    html = render_html(report, write_report_dir(tmp_path, report))
    text = _text(html)
    # said plainly where the model is described: before the findings
    assert html.index('id="query-only"') < html.index("What was found")
    assert (
        f"Query-only audit: the model was audited through its endpoint {URL} (model unet 3) by "
        f"queries alone, budget {BUDGET} queries, 5230 sent." in text
    )
    assert "a fail is proof" in text and "weaker evidence" in text
    # the section: one row per check and level, then the totals
    section = html[html.index('<section id="queries">') : html.index("<h2>Provenance</h2>")]
    rows = re.findall(r"<tr>(.*?)</tr>", section[: section.index("</table>")], re.S)
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in rows]
    assert cells[0] == ["check", "level δ", "sent", "answered", "requests", "failures", "retries"]
    assert cells[1] == ["probe", "—", "4", "4", "0", "0", "0"]
    assert cells[4] == ["worst_case", "0.01", "2000", "1990", "200", "1", "1"]
    assert cells[-1] == ["total", "5230", "5200", "522", "3", "3"]
    assert "p50 0.012 s, p99 0.08 s, max 0.1 s" in _text(section)
    assert re.search(r"<td>http 503</td><td class=\"num\">2</td>", section)
    assert re.search(r"<td>timeout</td><td class=\"num\">1</td>", section)
    # the figure: one more PNG than the upload's page (curves, panels), in the section
    assert "What the budget bought" in section and 'id="queries-budget"' in section
    figure = re.search(r'id="queries-budget">\s*<img src="data:image/png;base64,([^"]+)"', section)
    assert figure is not None
    assert base64.b64decode(figure.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    upload = make_report()
    assert len(_images(html)) == len(_images(render_html(upload, tmp_path))) + 1
    assert "lower bound" in text and "white-box" in text
    # provenance names the endpoint, never a secret (the report holds none)
    assert "endpoint</td>" in html and f'<span class="mono">{URL}</span>, model unet' in html


def test_the_budget_points_are_cumulative_over_ascending_levels() -> None:
    report = make_query_report()
    # ledger rows in any order; a level the report has no error for still costs queries
    rows = report["queries"]["by_check"]
    rows.reverse()
    rows.append(
        {
            "check": "worst_case",
            "level": 0.001,
            "sent": 500,
            "answered": 500,
            "requests": 50,
            "failures": 0,
            "retries": 0,
        }
    )
    assert budget_points(report) == [
        BudgetPoint(0.01, 2500, 0.3),
        BudgetPoint(0.05, 5500, 0.9),
    ]
    # only the queried model's worst case counts, not the local baseline's
    baseline = {**report["checks"][2], "subject": "baseline", "levels": []}
    report["checks"].insert(3, baseline)
    assert [p.error for p in budget_points(report)] == [0.3, 0.9]


def test_no_worst_case_no_figure(tmp_path: Path) -> None:
    report = make_query_report()
    report["checks"] = [c for c in report["checks"] if c["kind"] != "worst_case"]
    report["config"]["checks"] = report["config"]["checks"][:1]
    assert budget_points(report) == []
    section = queries_section(report)
    assert section is not None and section.figure is None
    html = render_html(report, tmp_path)
    assert 'id="queries"' in html and "What the budget bought" not in html
    assert 'id="queries-budget"' not in html


def test_an_upload_has_no_queries_section(tmp_path: Path) -> None:
    report = make_report()
    assert queries_section(report) is None
    html = render_html(report, tmp_path)
    for marker in ('id="query-only"', 'id="queries"', "Query-only", "budget", "endpoint"):
        assert marker not in html
    # and the page is the one an upload always had: adding then dropping `queries` is a no-op
    with_queries = make_query_report()
    del with_queries["queries"], with_queries["model"]["endpoint"]
    assert "Query-only" not in render_html(with_queries, tmp_path)


def test_endpoint_values_are_escaped(tmp_path: Path) -> None:
    report = make_query_report(model_name=HOSTILE, endpoint_model=HOSTILE, version=HOSTILE)
    report["model"]["endpoint"]["url"] = 'https://x.example/"><img src=x onerror=alert(3)>'
    report["queries"]["failures_by_cause"] = {HOSTILE: 1}
    report["queries"]["by_check"][0]["check"] = HOSTILE
    html = render_html(report, tmp_path)
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "(model &lt;script&gt;alert(1)&lt;/script&gt; &lt;script&gt;" in _text(html)
