"""Request authentication: the Bearer API key of a request, and a short cache of live keys.

Keys themselves (creation, hashing, revocation) live in service.db.keys.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, make_transient_to_detached

from service.api.refresh_cache import RefreshingCache
from service.db.keys import KEY_PREFIX, hash_key, listen_for_revocations
from service.db.tables import ApiKey, Tenant
from service.domain.errors import Unauthorized


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


# How long a key past its TTL may still be honoured while one request re-checks it.
KEY_REFRESH_GRACE_SECONDS = 1.0


class ApiKeyCache:
    """Live keys seen in the last `ttl_seconds`, by the sha256 of the secret (never the secret):
    a status poll then authenticates without a query. Only successes are kept, so a new key
    works at once. When an entry's time is up one request checks the key again while the others
    are let in for at most `KEY_REFRESH_GRACE_SECONDS` more (service/api/refresh_cache.py), so
    the clients of a busy key do not all query at once. A revocation made in this process
    (`revoke_api_key`) takes effect at once, one made elsewhere (the CLI, another gateway)
    within `ttl_seconds` plus that grace. Thread-safe."""

    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache: RefreshingCache[str, _CachedTenant] = RefreshingCache(
            ttl_seconds,
            grace_seconds=min(ttl_seconds, KEY_REFRESH_GRACE_SECONDS),
            max_entries=max_entries,
            clock=clock,
        )
        listen_for_revocations(self)

    @property
    def ttl_seconds(self) -> float:
        return self._cache.ttl_seconds

    def get(self, digest: str) -> Tenant | None:
        """The tenant of a live cached key; None: authenticate (and `put`) it anew."""
        entry = self._cache.get(digest)
        if entry is None:
            return None
        # A fresh detached copy per request: no session shares an instance with another.
        tenant = Tenant(id=entry.id, name=entry.name, created_at=entry.created_at)
        make_transient_to_detached(tenant)
        return tenant

    def tenant_id(self, digest: str) -> str | None:
        """The tenant id of a live cached key, claiming no re-check (the poll fast path: on a
        miss the route authenticates)."""
        entry = self._cache.peek(digest)
        return None if entry is None else entry.id

    def put(self, digest: str, tenant: Tenant) -> None:
        self._cache.put(digest, _CachedTenant(tenant.id, tenant.name, tenant.created_at))

    def forget(self, digest: str) -> None:
        self._cache.forget(digest)


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
    """The tenant of a live API key named by an Authorization header, else Unauthorized: one
    query. With a cache, the answer is kept (a live key) or dropped (a dead one); asking the
    cache first is the caller's part (`cached_tenant`), so that a request the cache sent to
    re-check a key does check it."""
    digest = _digest(authorization)
    # One query for the key and its tenant; a key whose tenant vanished matches nothing.
    row = session.execute(
        select(ApiKey.key_hash, ApiKey.revoked_at, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == digest)
    ).first()
    # Compare digests in constant time anyway: the lookup is by digest, never by secret.
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        if cache is not None:
            cache.forget(digest)  # revoked elsewhere: no stale grace for the other requests
        raise Unauthorized("The API key is not valid or has been revoked.")
    tenant: Tenant = row.Tenant
    if cache is not None:
        cache.put(digest, tenant)
    return tenant
