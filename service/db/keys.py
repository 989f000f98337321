"""API keys as stored: `tr_<random>` secrets shown once; only their sha256 is kept.

A key belongs to a tenant; every resource belongs to the tenant of the key that created it.
The gateway authenticates with these digests (service.api.auth); the command line creates,
lists and revokes keys through this module.
"""

from __future__ import annotations

import hashlib
import secrets
import weakref
from typing import Protocol

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from service.db.tables import ApiKey, Tenant, utcnow

KEY_PREFIX = "tr_"
# Enough of the secret to find a key in logs and listings; far too little to guess the rest.
DISPLAY_PREFIX_LENGTH = 10

# Called with the digest of every key revoked in this process (the gateway's key caches), so
# that a revocation made here takes effect at once. Weak: a dropped cache stops listening.
_revocation_listeners: weakref.WeakSet[_RevocationListener] = weakref.WeakSet()


class _RevocationListener(Protocol):
    def forget(self, digest: str) -> None: ...


def listen_for_revocations(listener: _RevocationListener) -> None:
    _revocation_listeners.add(listener)


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
    return key is not None and revoke_key(session, key)


def revoke_key(session: Session, key: ApiKey) -> bool:
    """Revoke a key found by find_api_keys; False when it was revoked already. Commits, and
    tells this process's key caches at once."""
    if key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    session.commit()
    for listener in list(_revocation_listeners):
        listener.forget(key.key_hash)
    return True


def list_api_keys(session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every key (of one tenant, when named) with its tenant's name, oldest first."""
    query = (
        select(ApiKey, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .order_by(ApiKey.created_at, ApiKey.id)
    )
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return [(key, name) for key, name in session.execute(query).all()]


def find_api_keys(session: Session, wanted: str) -> list[ApiKey]:
    """The keys `wanted` names: the whole secret (found by its hash, as the gateway does), or
    a key's id (key_…) or the start of its prefix (tr_…). A prefix shared with keys already
    revoked names the one live key; more than one key found means `wanted` is ambiguous."""
    if len(wanted) > DISPLAY_PREFIX_LENGTH and not wanted.startswith("key_"):
        match = ApiKey.key_hash == hash_key(wanted)
    else:
        match = or_(ApiKey.id == wanted, ApiKey.prefix.startswith(wanted, autoescape=True))
    found = list(session.scalars(select(ApiKey).where(match)).all())
    live = [key for key in found if key.revoked_at is None]
    return live if len(found) > 1 and len(live) == 1 else found
