"""API keys: `tr_<random>` secrets shown once; only their sha256 is stored.

A key belongs to a tenant; every resource belongs to the tenant of the key that created it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

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
    return True


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("Send 'Authorization: Bearer <api key>'.")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Use the Bearer scheme: 'Authorization: Bearer <api key>'.")
    return token.strip()


def authenticate(session: Session, authorization: str | None) -> Tenant:
    """The tenant of a live API key named by an Authorization header, else Unauthorized."""
    token = bearer_token(authorization)
    if not token.startswith(KEY_PREFIX):
        raise Unauthorized("The API key is not valid.")
    digest = hash_key(token)
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    # Compare digests in constant time anyway: the lookup is by digest, never by secret.
    if key is None or not hmac.compare_digest(key.key_hash, digest) or key.revoked_at is not None:
        raise Unauthorized("The API key is not valid or has been revoked.")
    tenant = session.get(Tenant, key.tenant_id)
    if tenant is None:  # a key whose tenant vanished is as good as no key
        raise Unauthorized("The API key is not valid.")
    return tenant
