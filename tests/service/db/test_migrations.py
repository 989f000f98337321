"""The Alembic migrations build exactly the tables of service/db/tables.py, idempotently."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from service.db.migrate import alembic_config, upgrade_to_head
from service.db.session import make_engine
from service.db.tables import Base


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_head_matches_the_models(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'sub' / 'm.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade_to_head(url)
    upgrade_to_head(url)  # a second run is a no-op
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            # One head (get_current_head refuses several), and the database is at it.
            head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
            assert head is not None and context.get_current_revision() == head
            assert set(inspect(conn).get_table_names()) >= set(Base.metadata.tables)
    finally:
        engine.dispose()
