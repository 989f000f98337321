"""Engines and sessions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.db.audit_changes import announcing_sessionmaker
from service.settings import get_settings


def make_engine(
    url: str,
    *,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    pool_timeout: float | None = None,
) -> Engine:
    """An engine for `url`; the pool arguments (QueuePool) default to SQLAlchemy's (5 + 10
    connections, 30 s wait). An in-memory SQLite database has no such pool: they are ignored."""
    pool_args: dict[str, Any] = {}
    in_memory = url.startswith("sqlite") and (
        ":memory:" in url or url in ("sqlite://", "sqlite:///")
    )
    if not in_memory:
        if pool_size is not None:
            pool_args["pool_size"] = pool_size
        if max_overflow is not None:
            pool_args["max_overflow"] = max_overflow
        if pool_timeout is not None:
            pool_args["pool_timeout"] = pool_timeout
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **pool_args
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool_args)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    """The process's sessions (workers, CLI): their commits announce the audits they changed
    (service.db.audit_changes), so that gateways can keep polls' answers until then."""
    return announcing_sessionmaker(get_engine(), get_settings())


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commits on success, rolls back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
