"""API keys: `tr_<random>` secrets shown once; only their sha256 is stored.

A key belongs to a tenant; every resource belongs to the tenant of the key that created it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, make_transient_to_detached

from service.db.models import ApiKey, Tenant, utcnow
from service.errors import Unauthorized

KEY_PREFIX = "tr_"
# Enough of the secret to find a key in logs and listings; far too little to guess the rest.
DISPLAY_PREFIX_LENGTH = 10


def hash_key(secret: str) -> str:
    # A plain digest is enough: the secret carries 256 random bits, so there is nothing to
    # brute-force and no need for a slow password hash.
    return hashlib.sha256(secret.encode()).hexdigest()


def get_or_create_tenant(session: Session, tenant_name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, tenant_name: str) -> str:
    """Create a key for the tenant (created on demand), commit, and return the secret.

    The secret is not stored anywhere: the caller must show it to the user now.
    """
    tenant = get_or_create_tenant(session, tenant_name)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            tenant_id=tenant.id, prefix=secret[:DISPLAY_PREFIX_LENGTH], key_hash=hash_key(secret)
        )
    )
    session.commit()
    return secret


def revoke_api_key(session: Session, secret: str) -> bool:
    """Revoke a key by its secret; returns whether a live key was found. Commits."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    session.commit()
    for cache in list(_CACHES):
        cache.forget(key.key_hash)
    return True


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("Send 'Authorization: Bearer <api key>'.")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Use the Bearer scheme: 'Authorization: Bearer <api key>'.")
    return token.strip()


@dataclass(frozen=True)
class _CachedTenant:
    id: str
    name: str
    created_at: datetime
    expires: float


class ApiKeyCache:
    """Live keys seen in the last `ttl_seconds`, by the sha256 of the secret (never the secret):
    a status poll then authenticates without a query. Only successes are kept, so a new key
    works at once; a revocation made in this process (`revoke_api_key`) takes effect at once,
    one made elsewhere (the CLI, another gateway) within `ttl_seconds`. Thread-safe."""

    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, _CachedTenant] = {}
        self._lock = threading.Lock()
        _CACHES.add(self)

    def get(self, digest: str) -> Tenant | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None and entry.expires <= self._clock():
                del self._entries[digest]
                entry = None
        if entry is None:
            return None
        # A fresh detached copy per request: no session shares an instance with another.
        tenant = Tenant(id=entry.id, name=entry.name, created_at=entry.created_at)
        make_transient_to_detached(tenant)
        return tenant

    def put(self, digest: str, tenant: Tenant) -> None:
        if self.ttl_seconds <= 0:
            return
        entry = _CachedTenant(
            tenant.id, tenant.name, tenant.created_at, self._clock() + self.ttl_seconds
        )
        with self._lock:
            if len(self._entries) >= self.max_entries:
                now = self._clock()
                for stale in [d for d, e in self._entries.items() if e.expires <= now]:
                    del self._entries[stale]
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()  # a flood of distinct keys: start over
            self._entries[digest] = entry

    def forget(self, digest: str) -> None:
        with self._lock:
            self._entries.pop(digest, None)


# Every cache of this process, so that revoke_api_key reaches them all.
_CACHES: weakref.WeakSet[ApiKeyCache] = weakref.WeakSet()


def _digest(authorization: str | None) -> str:
    token = bearer_token(authorization)
    if not token.startswith(KEY_PREFIX):
        raise Unauthorized("The API key is not valid.")
    return hash_key(token)


def cached_tenant(authorization: str | None, cache: ApiKeyCache) -> Tenant | None:
    """The tenant of a key the cache holds (no I/O); None: ask `authenticate`. A malformed
    header is Unauthorized here already."""
    return cache.get(_digest(authorization))


def authenticate(
    session: Session, authorization: str | None, cache: ApiKeyCache | None = None
) -> Tenant:
    """The tenant of a live API key named by an Authorization header, else Unauthorized.
    With a cache, a key seen live within its TTL is not looked up again."""
    digest = _digest(authorization)
    if cache is not None:
        cached = cache.get(digest)
        if cached is not None:
            return cached
    # One query for the key and its tenant; a key whose tenant vanished matches nothing.
    row = session.execute(
        select(ApiKey.key_hash, ApiKey.revoked_at, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == digest)
    ).first()
    # Compare digests in constant time anyway: the lookup is by digest, never by secret.
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        raise Unauthorized("The API key is not valid or has been revoked.")
    tenant: Tenant = row.Tenant
    if cache is not None:
        cache.put(digest, tenant)
    return tenant
