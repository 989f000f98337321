"""The security headers of stored files sent as documents, and the responses that carry them:
shared by `/v1/audits` (service/api/audit_routes.py) and the console (service/api/console/)."""

from __future__ import annotations

from starlette.responses import Response

from service.api.stored_files import stored_response
from service.storage.objects import ObjectInfo
from service.storage.stores import ArtifactStore

# The media type each stored report file (service.domain.audit_rules.report_path) is sent as.
REPORT_FILES = {"report": "application/json", "report.html": "text/html; charset=utf-8"}
# The report page needs no script and no request (figures are data URIs): forbid both.
REPORT_HTML_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# Media types a browser renders as a document that could run script: served, wherever they come
# from (report.html or an artifact), with the report page's security headers.
ACTIVE_MEDIA_TYPES = frozenset({"text/html", "application/xhtml+xml", "image/svg+xml"})


def security_headers(media_type: str) -> dict[str, str] | None:
    """The headers an answer of this media type needs: the CSP for documents, else none."""
    essence = media_type.split(";", 1)[0].strip().lower()
    return {"Content-Security-Policy": REPORT_HTML_CSP} if essence in ACTIVE_MEDIA_TYPES else None


def report_response(
    artifacts: ArtifactStore, found: tuple[str, ObjectInfo], name: str, *, presign: bool = False
) -> Response:
    """The stored report file `name` (a key of REPORT_FILES; `found`: the rules' report_file),
    with byte ranges and its headers (`presign`: see stored_response)."""
    media_type = REPORT_FILES[name]
    key, info = found
    headers = security_headers(media_type)
    return stored_response(
        artifacts, key, info, media_type=media_type, headers=headers, presign=presign
    )
