"""`tightrope keys create / list / revoke`: keys in the configured database, listed without
their secrets, revoked by id or prefix, and a revoked key is refused by the gateway's own
authentication."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.api.auth import authenticate
from service.db import session as db_session
from service.domain.errors import Unauthorized
from service.settings import get_settings
from workers.cli.main import app

runner = CliRunner()
_CACHES = (get_settings, db_session.get_engine, db_session.get_sessionmaker)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The CLI's settings and sessions on this test's own SQLite database."""
    data = tmp_path / "data"
    monkeypatch.setenv("TIGHTROPE_DATA_DIR", str(data))
    monkeypatch.delenv("TIGHTROPE_DATABASE_URL", raising=False)
    for cached in _CACHES:
        cached.cache_clear()
    yield data
    db_session.get_engine().dispose()
    for cached in _CACHES:
        cached.cache_clear()


def _create(tenant: str) -> str:
    result = runner.invoke(app, ["keys", "create", "--tenant", tenant])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert re.fullmatch(r"tr_[A-Za-z0-9_-]{40,}", secret), result.stdout
    return secret


def _list(*extra: str) -> dict[str, list[str]]:
    """`keys list` parsed: its rows by prefix (id, prefix, tenant, created, revoked)."""
    result = runner.invoke(app, ["keys", "list", *extra])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["id", "prefix", "tenant", "created", "revoked"]
    rows = [line.split() for line in lines[1:]]
    assert all(len(row) == 5 for row in rows), result.stdout
    return {row[1]: row for row in rows}


def _authenticates(secret: str) -> bool:
    with db_session.session_scope() as session:
        try:
            authenticate(session, f"Bearer {secret}")
        except Unauthorized:
            return False
    return True


def test_list_shows_keys_without_secrets_and_revoke_refuses_the_key(data_dir: Path) -> None:
    first = _create("acme")
    second = _create("globex")
    assert (data_dir / "tightrope.db").is_file()  # the data dir of TIGHTROPE_DATA_DIR

    listed = runner.invoke(app, ["keys", "list"])
    assert listed.exit_code == 0, listed.output
    assert first not in listed.output and second not in listed.output
    rows = _list()
    assert set(rows) == {first[:10], second[:10]}
    row_a, row_b = rows[first[:10]], rows[second[:10]]
    assert row_a[0].startswith("key_") and row_b[0].startswith("key_")
    assert (row_a[2], row_b[2]) == ("acme", "globex")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row_a[3])
    assert row_a[4] == row_b[4] == "-"
    assert _list("--tenant", "globex").keys() == {second[:10]}
    assert _authenticates(first) and _authenticates(second)

    revoked = runner.invoke(app, ["keys", "revoke", first[:10]])
    assert revoked.exit_code == 0, revoked.output
    assert row_a[0] in revoked.stdout and first not in revoked.output

    rows = _list()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rows[first[:10]][4])
    assert rows[second[:10]][4] == "-"
    assert not _authenticates(first)
    assert _authenticates(second)

    # again: nothing to do, still exit 0
    again = runner.invoke(app, ["keys", "revoke", row_a[0]])
    assert again.exit_code == 0, again.output
    assert "already revoked" in again.stdout


def test_revoke_by_id_or_whole_key(data_dir: Path) -> None:
    by_id, by_secret = _create("acme"), _create("acme")
    rows = _list("--tenant", "acme")
    result = runner.invoke(app, ["keys", "revoke", rows[by_id[:10]][0]])
    assert result.exit_code == 0, result.output
    assert not _authenticates(by_id) and _authenticates(by_secret)
    result = runner.invoke(app, ["keys", "revoke", by_secret])
    assert result.exit_code == 0, result.output
    assert not _authenticates(by_secret)
    assert all(row[4] != "-" for row in _list().values())


def test_revoke_refuses_unknown_and_ambiguous_names(data_dir: Path) -> None:
    secrets = [_create("acme"), _create("acme")]
    unknown = runner.invoke(app, ["keys", "revoke", "key_nope"])
    assert unknown.exit_code == 1
    assert "no API key matches" in unknown.stderr
    # "tr_" is the start of every key: it names none of them
    ambiguous = runner.invoke(app, ["keys", "revoke", "tr_"])
    assert ambiguous.exit_code == 2
    assert "matches 2 keys" in ambiguous.stderr
    assert all(_authenticates(secret) for secret in secrets)
    assert all(row[4] == "-" for row in _list().values())


def test_a_prefix_shared_with_revoked_keys_names_the_live_one(data_dir: Path) -> None:
    first, second = _create("acme"), _create("acme")
    assert runner.invoke(app, ["keys", "revoke", first]).exit_code == 0
    # "tr_" matches both keys, but only one is live: that one is meant
    result = runner.invoke(app, ["keys", "revoke", "tr_"])
    assert result.exit_code == 0, result.output
    assert "revoked" in result.stdout and "already" not in result.stdout
    assert not _authenticates(second)
    # with both revoked, a shared prefix is ambiguous again, not "already revoked"
    again = runner.invoke(app, ["keys", "revoke", "tr_"])
    assert again.exit_code == 2 and "matches 2 keys" in again.stderr


def test_list_of_an_empty_database(data_dir: Path) -> None:
    result = runner.invoke(app, ["keys", "list"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "no API keys" in result.stderr
    assert str(data_dir / "tightrope.db") in result.stderr
