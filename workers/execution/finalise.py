"""The worker's last step on a report the runner wrote: sign report.json with the service's key,
then render report.html next to it (both are imported as artifacts afterwards).

Done in the Celery process, outside the sandbox: the runner never sees the private key. A
failure to sign or render is logged and leaves the report as the runner wrote it (unsigned,
without HTML) rather than losing the audit's result.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from schemas.canonical import canonical_json
from service.reports import signatures as signing
from service.settings import Settings
from workers.reporting.html import REPORT_JSON, write_report_html

log = logging.getLogger(__name__)


def finalise_report(report: dict[str, Any], out_dir: Path, settings: Settings) -> dict[str, Any]:
    """Sign and render; returns the report as stored (signed when signing worked)."""
    try:
        key = signing.load_or_create_private_key(signing.key_path(settings))
        report = signing.sign_report(report, key)
        (out_dir / REPORT_JSON).write_text(canonical_json(report), encoding="utf-8")
    except (OSError, ValueError) as exc:
        log.error("could not sign the report in %s: %s", out_dir, exc)
    try:
        write_report_html(out_dir, report)
    except Exception:  # a figure that cannot be drawn must not cost the audit its result
        log.exception("could not render report.html in %s", out_dir)
    return report
