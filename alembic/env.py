"""Alembic environment: runs migrations online against the URL chosen by service.settings."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from service.db.session import make_engine
from service.db.tables import Base
from service.settings import get_settings

config = context.config
# Only the command-line entry point configures logging; upgrade_to_head() from an app or a
# test must not reset the host process's loggers.
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.attributes.get("url") or get_settings().resolved_database_url
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=url.startswith("sqlite"),  # SQLite needs batch ALTERs
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run them online")
run_migrations_online()
