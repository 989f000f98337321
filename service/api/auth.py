"""Request authentication: the Bearer API key of a request, and a short cache of live keys.

Keys themselves (creation, hashing, revocation) live in service.db.keys.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, make_transient_to_detached

from service.api.problems import Unauthorized
from service.db.keys import KEY_PREFIX, hash_key, listen_for_revocations
from service.db.models import ApiKey, Tenant


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
        listen_for_revocations(self)

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

    def tenant_id(self, digest: str) -> str | None:
        """The tenant id of a live cached key, without building a Tenant (the poll fast path)."""
        with self._lock:
            entry = self._entries.get(digest)
            return entry.id if entry is not None and entry.expires > self._clock() else None

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


def cached_tenant_id(authorization: str | None, cache: ApiKeyCache) -> str | None:
    """The tenant id of a well-formed Bearer key the cache holds; None for anything else (a
    missing, malformed, unknown or expired key: the full authentication path answers those)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(KEY_PREFIX):
        return None
    return cache.tenant_id(hash_key(token))


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
