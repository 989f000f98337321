"""API keys as stored (service/db/keys.py): listed oldest first with their tenant, found by the
whole secret, by id or by prefix (a prefix shared with revoked keys names the live one),
revoked once, with this process's key caches told at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db import keys
from service.db.migrate import upgrade_to_head
from service.db.session import make_engine
from service.db.tables import ApiKey


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    with sessionmaker(bind=engine, expire_on_commit=False)() as s:
        yield s
    engine.dispose()


def _key(session: Session, secret: str) -> ApiKey:
    found = keys.find_api_keys(session, secret)
    assert len(found) == 1
    return found[0]


def test_keys_are_listed_oldest_first_with_their_tenant(session: Session) -> None:
    first = keys.create_api_key(session, "acme")
    second = keys.create_api_key(session, "globex")
    third = keys.create_api_key(session, "acme")

    listed = [(key.prefix, name) for key, name in keys.list_api_keys(session)]
    assert listed == [
        (first[:10], "acme"),
        (second[:10], "globex"),
        (third[:10], "acme"),
    ]
    assert [key.prefix for key, _ in keys.list_api_keys(session, "acme")] == [
        first[:10],
        third[:10],
    ]
    assert keys.list_api_keys(session, "nobody") == []


def test_a_key_is_found_by_its_secret_its_id_or_its_prefix(session: Session) -> None:
    secret = keys.create_api_key(session, "acme")
    other = keys.create_api_key(session, "acme")
    key = _key(session, secret)

    assert key.key_hash == keys.hash_key(secret)
    assert keys.find_api_keys(session, key.id) == [key]
    assert keys.find_api_keys(session, secret[:10]) == [key]
    assert keys.find_api_keys(session, secret[:-1]) == []  # not the whole secret: no match
    assert len(keys.find_api_keys(session, "tr_")) == 2  # ambiguous: every key
    assert _key(session, other) is not key
    assert keys.find_api_keys(session, "%") == []  # a prefix is matched literally


def test_a_prefix_shared_with_revoked_keys_names_the_live_one(session: Session) -> None:
    revoked = _key(session, keys.create_api_key(session, "acme"))
    live = _key(session, keys.create_api_key(session, "acme"))
    assert keys.revoke_key(session, revoked)

    assert keys.find_api_keys(session, "tr_") == [live]
    assert keys.revoke_key(session, live)
    assert len(keys.find_api_keys(session, "tr_")) == 2  # none live: ambiguous again


def test_a_key_is_revoked_once_and_the_caches_are_told(session: Session) -> None:
    class Cache:
        def __init__(self) -> None:
            self.forgotten: list[str] = []

        def forget(self, digest: str) -> None:
            self.forgotten.append(digest)

    cache = Cache()
    keys.listen_for_revocations(cache)
    secret = keys.create_api_key(session, "acme")
    key = _key(session, secret)

    assert keys.revoke_key(session, key)
    assert key.revoked_at is not None
    assert not keys.revoke_key(session, key)
    assert not keys.revoke_api_key(session, secret)
    assert cache.forgotten == [key.key_hash]
