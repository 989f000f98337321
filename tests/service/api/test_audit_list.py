"""The audit list with many audits (issue 11): keyset pages are complete and in order, with and
without filters, ties on created_at included; and on SQLite every page, filtered or not, is an
index search that starts at the token (benchmarks/audit_list.py times 100,000 audits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, select, text
from sqlalchemy.orm import Session

from benchmarks.audit_list import seed
from service.db.migrate import upgrade_to_head
from service.db.session import make_engine
from service.db.tables import Audit, Tenant
from service.domain.audit_rules import list_page

AUDITS = 3_000


def walk(session: Session, tenant: Tenant, page_size: int, **filters: Any) -> list[str]:
    ids: list[str] = []
    token = None
    while True:
        page = list_page(
            session, tenant, filters.get("status"), filters.get("model_id"), page_size, token
        )
        ids += [item.id for item in page.items]
        token = page.next_page_token
        if token is None:
            return ids


def expected(session: Session, tenant: Tenant, **filters: Any) -> list[str]:
    query = select(Audit.id).where(Audit.tenant_id == tenant.id)
    for name, value in filters.items():
        query = query.where(getattr(Audit, name) == value)
    return list(session.scalars(query.order_by(Audit.created_at.desc(), Audit.id.desc())))


def test_every_page_of_every_filter_is_complete_and_in_order(database_url: str) -> None:
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    try:
        with Session(engine, expire_on_commit=False) as session:
            tenant, _, rare = seed(session, AUDITS)
            # Ten audits created in the same instant: the id breaks the tie, none is skipped.
            same = session.scalars(select(Audit).where(Audit.tenant_id == tenant.id)).first()
            assert same is not None
            twins = [
                {
                    "id": f"aud_twin_{n}",
                    "tenant_id": tenant.id,
                    "model_id": same.model_id,
                    "request": {},
                    "request_hash": "0" * 64,
                    "status": "failed",
                    "created_at": same.created_at,
                    "updated_at": same.created_at,
                }
                for n in range(10)
            ]
            session.execute(insert(Audit), twins)
            session.commit()
            for filters in ({}, {"status": "failed"}, {"model_id": rare}, {"status": "running"}):
                want = expected(session, tenant, **filters)
                assert want, filters
                for page_size in (7, 100):
                    assert walk(session, tenant, page_size, **filters) == want, filters
    finally:
        engine.dispose()


def test_every_page_is_an_index_search_from_the_token_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'list.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM audits" in statement:
            statements.append((statement, parameters))

    try:
        with Session(engine, expire_on_commit=False) as session:
            tenant, _, rare = seed(session, 300)
            event.listen(engine, "before_cursor_execute", capture)
            cases = {
                "ix_audits_tenant_created": {},
                "ix_audits_tenant_status_created": {"status": "failed"},
                "ix_audits_tenant_model_created": {"model_id": rare},
            }
            for index, filters in cases.items():
                first = list_page(
                    session, tenant, filters.get("status"), filters.get("model_id"), 2, None
                )
                assert first.next_page_token is not None
                statements.clear()
                list_page(
                    session,
                    tenant,
                    filters.get("status"),
                    filters.get("model_id"),
                    2,
                    first.next_page_token,
                )
                ((statement, parameters),) = statements
                with engine.connect() as conn:
                    plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
                    details = " ".join(str(row[-1]) for row in plan.all())
                # A search of the filter's index bounded by the token's row value; no sort.
                assert f"SEARCH audits USING INDEX {index}" in details, (filters, details)
                assert "(created_at,id)<(?,?)" in details, (filters, details)
                assert "TEMP B-TREE" not in details, (filters, details)
            event.remove(engine, "before_cursor_execute", capture)
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM audits")).scalar() == 330
    finally:
        engine.dispose()
