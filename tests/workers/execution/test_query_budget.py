"""The query budget an endpoint model's audit shares among its steps (workers.execution.
query_budget): ledgers drawing on it at once, as shards on several workers do, never send more
than the budget together; what a step drew and did not send goes back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.db.session import make_engine
from service.db.tables import Audit, Base, Model, Tenant
from workers.execution.query_budget import DRAW_CHUNK, AuditQueryBudget
from workers.shared.query_ledger import QueryBudgetExhausted, QueryLedger


@pytest.fixture
def engine(database_url: str, tmp_path: Path) -> Iterator[Engine]:
    (tmp_path / "data").mkdir(exist_ok=True)
    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def new_audit(engine: Engine) -> str:
    with Session(engine) as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        model = Model(
            tenant_id=tenant.id, name="m", spec={}, format="endpoint", sha256="0" * 64, size_bytes=0
        )
        session.add(model)
        session.flush()
        audit = Audit(tenant_id=tenant.id, model_id=model.id, request={}, request_hash="h")
        session.add(audit)
        session.commit()
        return audit.id


@pytest.mark.parametrize("total", [5000, 3 * DRAW_CHUNK + 7])
def test_concurrent_steps_never_send_more_than_the_budget(engine: Engine, total: int) -> None:
    audit_id = new_audit(engine)
    pool = AuditQueryBudget(engine, audit_id, total)
    ledgers = [QueryLedger(budget=total, source=pool) for _ in range(4)]
    sent = [0] * 4

    def spend(index: int) -> None:
        while True:
            try:
                ledgers[index].reserve(("worst_case", 0.1), 37)
            except QueryBudgetExhausted:
                return
            sent[index] += 37

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(sent) <= total
    assert sum(sent) > total - 4 * 37  # each step stops short of one request at most
    assert all(ledger.sent == spent for ledger, spent in zip(ledgers, sent, strict=True))
    for ledger in ledgers:  # each step gives back what it drew and did not send
        unsent, ledger.granted = ledger.granted, 0
        pool.give_back(unsent)
    with Session(engine) as session:
        audit = session.get(Audit, audit_id)
        assert audit is not None and audit.queries_drawn == sum(sent)


def test_a_request_larger_than_what_is_left_is_refused_and_sends_nothing(engine: Engine) -> None:
    pool = AuditQueryBudget(engine, new_audit(engine), 100)
    ledger = QueryLedger(budget=100, source=pool)
    ledger.reserve(("probe", None), 60)
    other = QueryLedger(budget=100, source=pool)
    with pytest.raises(QueryBudgetExhausted, match="budget of 100 is spent"):
        other.reserve(("probe", None), 50)
    assert other.sent == 0
    ledger.reserve(("probe", None), 40)  # what it drew in advance covers it
    assert ledger.sent == 100
