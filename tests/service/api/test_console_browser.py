"""The web console in a real headless Chromium against a running gateway (uvicorn): sign in,
the audit list with progress refreshed in place, open a report, compare two audits, a narrow
screen, another tenant's audit refused, sign out; no console error and no request that leaves
the origin. Takes the screenshot of docs/console.md (written there with
TIGHTROPE_UPDATE_SCREENSHOTS=1).

Needs Chromium, like tests/workers/reporting/test_browser.py: under `make test` or CI
(TIGHTROPE_REQUIRE_SERVICES) a missing Chromium fails this test, never skips it silently."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.db.migrate import upgrade_to_head
from service.db.session import make_engine
from service.db.tables import Audit
from service.settings import Settings
from tests.service.api.test_console import add_audit, add_model, new_tenant, scaled_report
from tests.service.api.test_poll_load import serve
from tests.service.reports.chromium import Browser
from workers.reporting.html import render_html

SCREENSHOT = Path(__file__).resolve().parents[3] / "docs" / "console.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.needs("chromium")


def _report(factor: float, verdict: str, model_name: str) -> tuple[dict, str]:
    report = scaled_report(factor)
    report["verdict"] = verdict
    report["model"]["name"] = model_name
    # The embedded page as the workers render it (figures as data URIs, no script).
    return report, render_html(report, Path("/nonexistent"))


@pytest.mark.needs("chromium", "redis")
def test_the_console_in_chromium(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'tightrope.db'}"
    (tmp_path / "data").mkdir()
    upgrade_to_head(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    engine = make_engine(url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    try:
        _drive(tmp_path, url, settings, sessions)
    finally:
        engine.dispose()


def _drive(tmp_path: Path, url: str, settings: Settings, sessions: sessionmaker[Session]) -> None:
    acme = new_tenant(sessions, "acme-procurement")
    other = new_tenant(sessions, "another-vendor")
    unet = add_model(sessions, acme, "mri-unet-4x")
    robust = add_model(sessions, acme, "mri-unet-4x-finetuned")
    report_a, html_a = _report(1.0, "fail", "mri-unet-4x")
    report_b, html_b = _report(0.4, "pass", "mri-unet-4x-finetuned")
    audit_a = add_audit(
        sessions, settings, acme, unet, report=report_a, html=html_a, minutes_ago=30
    )
    audit_b = add_audit(
        sessions, settings, acme, robust, report=report_b, html=html_b, minutes_ago=20
    )
    running = add_audit(
        sessions,
        settings,
        acme,
        robust,
        "running",
        minutes_ago=5,
        progress_fraction=0.35,
        progress_message="worst_case: level 2 of 3",
    )
    add_audit(sessions, settings, acme, unet, "queued", minutes_ago=1)
    theirs = add_audit(sessions, settings, other, add_model(sessions, other, "their-model"))

    with contextmanager(serve)(tmp_path, url) as base, Browser(tmp_path / "profile") as browser:
        browser.viewport(1200, 900)
        # Signed out, /ui leads to the sign-in form; the first Tab reaches the skip link.
        browser.navigate(f"{base}/ui")
        assert browser.evaluate("location.pathname") == "/ui/sign-in"
        browser.press("Tab", "Tab", 9)
        assert browser.evaluate("document.activeElement.className") == "skip"
        assert browser.evaluate(UNLABELLED) == []

        # A wrong key: the form again (a 401), with the reason announced.
        errors_before = len(browser.errors)
        browser.submit(
            "document.querySelector('#api-key').value = 'tr_wrong';"
            "document.querySelector('#sign-in').click()"
        )
        assert "not valid" in browser.evaluate("document.querySelector('[role=alert]').textContent")
        assert (f"{base}/ui/sign-in", 401) in browser.responses
        _expected_status_error(browser, errors_before, 401)

        browser.submit(
            f"document.querySelector('#api-key').value = {json.dumps(acme.key)};"
            "document.querySelector('#sign-in').click()"
        )
        assert browser.evaluate("location.pathname") == "/ui/audits"
        assert browser.evaluate("document.cookie") == ""  # HttpOnly: no script sees the session
        rows = browser.evaluate(
            "Array.from(document.querySelectorAll('#audits tbody tr')).map(r => r.id)"
        )
        assert len(rows) == 4 and f"row-{theirs}" not in rows
        assert browser.evaluate(UNLABELLED) == []

        # Progress refreshes in place: the page is not reloaded (the marker survives).
        browser.evaluate("window.stillTheSamePage = true")
        progress = f"document.querySelector('#row-{running} progress').value"
        assert browser.evaluate(progress) == 35
        with sessions() as session:
            session.execute(update(Audit).where(Audit.id == running).values(progress_fraction=0.8))
            session.commit()
        browser.wait_for(f"{progress} === 80")
        with sessions() as session:
            session.execute(
                update(Audit).where(Audit.id == running).values(status="failed", verdict="error")
            )
            session.commit()
        browser.wait_for(
            f"document.querySelector('#row-{running} [data-field=status]').textContent === 'failed'"
        )
        assert browser.evaluate("window.stillTheSamePage") is True
        assert "error" in browser.evaluate(
            f"document.querySelector('#row-{running} [data-field=verdict]').textContent"
        )

        # Open a report: the audit page, its signature, the embedded report.
        browser.submit(f"document.querySelector('#row-{audit_a} a.audit-link').click()")
        assert browser.evaluate("location.pathname") == f"/ui/audits/{audit_a}"
        assert "Valid" in browser.evaluate("document.querySelector('#signature').textContent")
        frame = browser.wait_for("document.querySelector('#report-frame').offsetHeight")
        assert frame > 200
        assert (f"{base}/ui/audits/{audit_a}/report.html", 200) in browser.responses
        links = browser.evaluate("Array.from(document.querySelectorAll('.links a')).length")
        assert links >= 3

        # Compare with B, chosen in the audit page's form.
        browser.evaluate(f"document.querySelector('#compare-with').value = {json.dumps(audit_b)}")
        browser.submit("document.querySelector('#compare-with-button').click()")
        assert browser.evaluate("location.pathname") == "/ui/compare"
        assert browser.evaluate("document.querySelectorAll('svg[role=img]').length") == 2
        assert browser.evaluate("document.querySelectorAll('polyline.series-B').length") == 3
        verdicts = browser.evaluate(
            "Array.from(document.querySelectorAll('[data-compare-verdict]'))"
            ".map(e => e.textContent.trim())"
        )
        assert verdicts == ["fail", "pass"]
        assert browser.evaluate(fits(1200)) is True
        shot = browser.screenshot()
        assert shot.startswith(PNG_MAGIC) and len(shot) > 10_000
        (tmp_path / "console.png").write_bytes(shot)
        if os.environ.get("TIGHTROPE_UPDATE_SCREENSHOTS") == "1":
            SCREENSHOT.write_bytes(shot)

        # A narrow screen: one column, nothing wider than the screen but the scroll regions.
        browser.viewport(390, 844, mobile=True)
        browser.navigate(browser.evaluate("location.href"))
        assert browser.evaluate(fits(390)) is True
        columns = "getComputedStyle(document.querySelector('.columns')).gridTemplateColumns"
        assert len(browser.evaluate(columns).split()) == 1
        browser.navigate(f"{base}/ui/audits")
        assert browser.evaluate(fits(390)) is True
        browser.viewport(1200, 900)

        # Another tenant's audit: a 404 page that names nothing of it.
        errors_before = len(browser.errors)
        browser.navigate(f"{base}/ui/audits/{theirs}")
        assert (f"{base}/ui/audits/{theirs}", 404) in browser.responses
        assert "their-model" not in browser.evaluate("document.body.textContent")
        assert browser.evaluate("document.querySelector('h1').textContent") == "Not found"
        _expected_status_error(browser, errors_before, 404)

        # Sign out: back to the form, and the pages need signing in again.
        browser.navigate(f"{base}/ui/audits")
        browser.submit("document.querySelector('#sign-out').click()")
        assert browser.evaluate("location.pathname") == "/ui/sign-in"
        browser.navigate(f"{base}/ui/audits/{audit_a}")
        assert browser.evaluate("location.pathname") == "/ui/sign-in"

    assert browser.errors == []
    elsewhere = [
        r for r in browser.requests if not (r.startswith(base + "/") or r.startswith("data:"))
    ]
    assert elsewhere == []
    failed = [(r, s) for r, s in browser.responses if s >= 400 and not r.endswith(theirs)]
    # The wrong key's answer (401) is the only other error status the pages saw.
    assert failed == [(f"{base}/ui/sign-in", 401)]


def _expected_status_error(browser: Browser, since: int, status: int) -> None:
    """Chromium logs the error status of a document it loads (the wrong key's 401, the other
    tenant's 404) as "Failed to load resource": exactly that one entry is taken out; anything
    else stays in browser.errors and fails the test."""
    new = browser.errors[since:]
    logged = [e for e in new if e.startswith("log: Failed to load resource") and str(status) in e]
    assert len(logged) == 1, new
    browser.errors.remove(logged[0])


# Form controls without a label (a <label for>, aria-label or aria-labelledby).
UNLABELLED = """Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea'))
  .filter(e => e.labels.length === 0 && !e.getAttribute('aria-label')
               && !e.getAttribute('aria-labelledby'))
  .map(e => e.outerHTML)"""


def fits(width: int) -> str:
    """The page does not scroll sideways at this width (wide tables scroll in their region)."""
    return f"document.documentElement.scrollWidth <= {width}"
