"""Console sign-in: a random session token in an HttpOnly, SameSite=Strict cookie (Secure over
HTTPS), mapped server side to the API key it signed in with (service.db.tables.ConsoleSession,
which stores only the token's sha256). Revoking the key ends its sessions at once; signing out
deletes the row. docs/console.md, "Sign-in and sessions".

CSRF: every state-changing form (sign-in, sign-out) carries a token and the request's Origin
(when the browser sends one) must be this service's. Before sign-in the token is a random
value also set in its own SameSite=Strict cookie (double submit); after sign-in it is an HMAC
of the session token, so nothing more is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Request, Response
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.db.keys import KEY_PREFIX, hash_key
from service.db.tables import ApiKey, ConsoleSession, Tenant, utcnow

SESSION_COOKIE = "tightrope_console"
FORM_COOKIE = "tightrope_console_form"
COOKIE_PATH = "/ui"
SESSION_SECONDS = 8 * 3600
FORM_TOKEN_SECONDS = 3600
# A token of ours is 43 url-safe characters; anything else in a cookie is ignored.
TOKEN_BYTES = 32
_TOKEN_LENGTH = len(secrets.token_urlsafe(TOKEN_BYTES))
# An API key is "tr_" and 43 characters; a longer value is not looked up at all.
MAX_KEY_LENGTH = 200
_CSRF_CONTEXT = b"tightrope-console-csrf"


@dataclass(frozen=True)
class ConsoleUser:
    """Who a console request is from: the tenant of the session's API key."""

    tenant: Tenant
    token: str

    @property
    def csrf_token(self) -> str:
        return csrf_of(self.token)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_of(token: str) -> str:
    """The CSRF token of a session: bound to it, useless without the HttpOnly cookie."""
    return hmac.new(token.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def _well_formed(token: str | None) -> bool:
    return (
        token is not None
        and len(token) == _TOKEN_LENGTH
        and all(c.isalnum() or c in "-_" for c in token)
    )


def sign_in(session: Session, api_key: str) -> str | None:
    """A new session token for a live API key (committed), else None. The key is looked up by
    its sha256, as the API does; the token is returned once and only its sha256 is stored."""
    api_key = api_key.strip()
    if not api_key.startswith(KEY_PREFIX) or len(api_key) > MAX_KEY_LENGTH:
        return None
    digest = hash_key(api_key)
    key = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    )
    if key is None or not hmac.compare_digest(key.key_hash, digest):
        return None
    now = utcnow()
    # Sessions of this key that ran out are forgotten here, so the table stays small.
    session.execute(
        delete(ConsoleSession).where(
            ConsoleSession.api_key_id == key.id, ConsoleSession.expires_at <= now
        )
    )
    token = secrets.token_urlsafe(TOKEN_BYTES)
    session.add(
        ConsoleSession(
            token_hash=_digest(token),
            api_key_id=key.id,
            created_at=now,
            expires_at=now + timedelta(seconds=SESSION_SECONDS),
        )
    )
    session.commit()
    return token


def current_user(session: Session, request: Request) -> ConsoleUser | None:
    """The signed-in user of a request: a session that has not expired, of a key that is not
    revoked (one query); None otherwise."""
    token = request.cookies.get(SESSION_COOKIE)
    if not _well_formed(token):
        return None
    assert token is not None
    tenant = session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .join(ConsoleSession, ConsoleSession.api_key_id == ApiKey.id)
        .where(
            ConsoleSession.token_hash == _digest(token),
            ConsoleSession.expires_at > utcnow(),
            ApiKey.revoked_at.is_(None),
        )
    )
    return None if tenant is None else ConsoleUser(tenant, token)


def sign_out(session: Session, user: ConsoleUser) -> None:
    session.execute(delete(ConsoleSession).where(ConsoleSession.token_hash == _digest(user.token)))
    session.commit()


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        secure=_secure(request),
        samesite="strict",
    )


def clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(
        name, path=COOKIE_PATH, httponly=True, secure=_secure(request), samesite="strict"
    )


def form_token(request: Request) -> str:
    """The sign-in form's CSRF token: the one the form cookie holds, or a new one."""
    token = request.cookies.get(FORM_COOKIE)
    return (
        token if token is not None and _well_formed(token) else secrets.token_urlsafe(TOKEN_BYTES)
    )


def set_form_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        FORM_COOKIE,
        token,
        max_age=FORM_TOKEN_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        secure=_secure(request),
        samesite="strict",
    )


def same_origin(request: Request) -> bool:
    """False for a request a browser says came from another site: an Origin header that is not
    this service's, or Sec-Fetch-Site other than same-origin (or none: typed, bookmarked)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin == f"{request.url.scheme}://{host}"


def form_token_valid(request: Request, submitted: str) -> bool:
    """The sign-in form's double submit: the field equals the form cookie."""
    cookie = request.cookies.get(FORM_COOKIE)
    return _well_formed(cookie) and hmac.compare_digest(str(cookie).encode(), submitted.encode())


def session_csrf_valid(user: ConsoleUser, submitted: str) -> bool:
    return hmac.compare_digest(user.csrf_token.encode(), submitted.encode())
