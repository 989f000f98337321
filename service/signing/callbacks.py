"""HMAC-SHA256 signatures of callback deliveries (docs/reports.md, "Callbacks").

Each POST to an audit's `callback_url` carries `Tightrope-Signature: t=<unix seconds>,v1=<hex>`
where `v1 = HMAC-SHA256(tenant secret, f"{t}.{body}")`. The tenant secret is derived from the
service's master secret (`TIGHTROPE_CALLBACK_SECRET`, or one generated on first use in
`<data_dir>/signing/callback-secret`), so one tenant cannot forge another's callbacks and a
tenant reads its own secret from `GET /v1/callback-secret`. The timestamp lets a receiver refuse
replays older than a few minutes.

Torch-free: the gateway serves the secret, the workers sign, receivers verify.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path

from service.settings import Settings
from service.signing.generated_files import generated_secret

HEADER = "Tightrope-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE_SECONDS = 300


def master_secret_path(settings: Settings) -> Path:
    return settings.data_dir / "signing" / "callback-secret"


def master_secret(settings: Settings) -> bytes:
    """The configured secret (TIGHTROPE_CALLBACK_SECRET, or the file at
    TIGHTROPE_CALLBACK_SECRET_PATH), or the generated one (created 0600 by the first process)."""
    if settings.callback_secret:
        return settings.callback_secret.encode("utf-8")
    if settings.callback_secret_path is not None:
        value = settings.callback_secret_path.read_text(encoding="utf-8").strip()
        if not value:
            raise RuntimeError(
                f"TIGHTROPE_CALLBACK_SECRET_PATH: the file {settings.callback_secret_path} is empty"
            )
        return value.encode("utf-8")
    path = master_secret_path(settings)
    generated = generated_secret(path, lambda: secrets.token_hex(32))
    if generated is not None:
        return generated.encode("ascii")
    raise RuntimeError(f"the callback secret file {path} is empty")


def secret_id(settings: Settings) -> str:
    """Names the master secret without revealing it (compared across machines at start)."""
    return hmac.new(master_secret(settings), b"tightrope-secret-id", hashlib.sha256).hexdigest()


def tenant_secret(settings: Settings, tenant_id: str) -> str:
    return hmac.new(
        master_secret(settings), f"tightrope-callback:{tenant_id}".encode(), hashlib.sha256
    ).hexdigest()


def signature(secret: str, body: bytes, timestamp: int) -> str:
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},{SCHEME}={signature(secret, body, t)}"


def verify_signature_header(
    secret: str,
    body: bytes,
    header: str,
    *,
    now: float | None = None,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
) -> bool:
    """What a receiver does: parse the header, refuse stale timestamps, compare in constant
    time."""
    fields: dict[str, str] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, value)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        return False
    expected = signature(secret, body, timestamp)
    return hmac.compare_digest(expected, fields.get(SCHEME, ""))
