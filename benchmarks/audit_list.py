"""The audit list with 100,000 audits in the table (issue 11): every page, every filter, one
index range scan.

Seeds one tenant with `--audits` audits (default 100,000; one in a thousand `running`, one in a
hundred `failed`, one in ten of a second model) and a second tenant with a tenth as many, then
times the query of `GET /v1/audits` (service.domain.audit_rules.list_page, as the route runs it
on a cache miss) for the first page, a page in the middle and the last page (keyset tokens), with
and without filters. Prints the median of `--repeats` runs of each in milliseconds, and the
ratio of the deepest page to the first: keyset pagination makes it about 1, where an offset (or
a filter the index cannot seek) grows with the depth.

    .venv/bin/python benchmarks/audit_list.py                         # SQLite in a temp dir
    .venv/bin/python benchmarks/audit_list.py --database-url postgresql+psycopg://...

Results: docs/benchmarks.md ("The audit list at 100,000 audits").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import delete, insert, select, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from benchmarks.poll_load import ready_model  # noqa: E402
from service.db.keys import get_or_create_tenant  # noqa: E402
from service.db.migrate import upgrade_to_head  # noqa: E402
from service.db.session import make_engine  # noqa: E402
from service.db.tables import Audit, Model, Tenant, utcnow  # noqa: E402
from service.domain.audit_rules import list_page  # noqa: E402
from service.domain.pagination import encode_token  # noqa: E402

PAGE_SIZE = 20
BATCH = 10_000


def status_of(i: int) -> str:
    return "running" if i % 1000 == 7 else "failed" if i % 100 == 3 else "succeeded"


def seed(session: Session, count: int) -> tuple[Tenant, str, str]:
    """`count` audits of one tenant (and count/10 of another): (tenant, model, rare model)."""
    ours = get_or_create_tenant(session, f"list-bench-{uuid.uuid4().hex[:8]}")
    theirs = get_or_create_tenant(session, f"other-bench-{uuid.uuid4().hex[:8]}")
    models = {}
    for tenant in (ours, theirs):
        for name in ("common", "rare"):
            models[(tenant.id, name)] = ready_model(session, tenant.id, name).id
    start = utcnow() - timedelta(days=30)
    for tenant, n in ((ours, count), (theirs, count // 10)):
        for first in range(0, n, BATCH):
            rows = [
                {
                    "id": f"aud_{tenant.id[-6:]}_{i:08d}",
                    "tenant_id": tenant.id,
                    "model_id": models[(tenant.id, "rare" if i % 10 == 5 else "common")],
                    "request": {},
                    "request_hash": "0" * 64,
                    "status": status_of(i),
                    "created_at": start + timedelta(seconds=i),
                    "updated_at": start + timedelta(seconds=i),
                }
                for i in range(first, min(first + BATCH, n))
            ]
            session.execute(insert(Audit), rows)
    session.commit()
    return ours, models[(ours.id, "common")], models[(ours.id, "rare")]


def remove_seeded(session: Session) -> None:
    tenants = select(Tenant.id).where(
        Tenant.name.like("list-bench-%") | Tenant.name.like("other-bench-%")
    )
    for table in (Audit, Model):
        session.execute(delete(table).where(table.tenant_id.in_(tenants)))
    session.execute(delete(Tenant).where(Tenant.id.in_(tenants)))
    session.commit()


def token_at(session: Session, tenant: Tenant, position: int, **filters: str) -> str | None:
    """The page token after the `position`-th audit of the (filtered) list, newest first."""
    if position == 0:
        return None
    query = select(Audit.created_at, Audit.id).where(Audit.tenant_id == tenant.id)
    for name, value in filters.items():
        query = query.where(getattr(Audit, name) == value)
    query = query.order_by(Audit.created_at.desc(), Audit.id.desc()).offset(position - 1)
    row = session.execute(query.limit(1)).one()
    return encode_token(row.created_at, row.id)


def timed(session: Session, tenant: Tenant, token: str | None, repeats: int, **filters: str):
    """Median milliseconds of list_page, and the ids of the page."""
    durations = []
    page = None
    for _ in range(repeats):
        session.expunge_all()
        started = time.perf_counter()
        page = list_page(
            session, tenant, filters.get("status"), filters.get("model_id"), PAGE_SIZE, token
        )
        durations.append((time.perf_counter() - started) * 1e3)
    assert page is not None
    return statistics.median(durations), [item.id for item in page.items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audits", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--database-url", help="default: SQLite in a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tightrope-list-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'list.db'}"
        upgrade_to_head(url)
        engine = make_engine(url)
        try:
            with Session(engine, expire_on_commit=False) as session:
                started = time.perf_counter()
                tenant, common, rare = seed(session, args.audits)
                seeded = time.perf_counter() - started
                if url.startswith("postgresql"):
                    session.execute(text("ANALYZE audits"))
                    session.commit()
                n = args.audits
                cases = [
                    ("all, first page", {}, 0),
                    ("all, middle page", {}, n // 2),
                    ("all, last page", {}, n - PAGE_SIZE),
                    ("status=running (1/1000), first", {"status": "running"}, 0),
                    ("status=running, last page", {"status": "running"}, n // 1000 - PAGE_SIZE),
                    ("status=failed (1/100), middle", {"status": "failed"}, n // 200),
                    ("model_id=rare (1/10), first", {"model_id": rare}, 0),
                    ("model_id=rare, last page", {"model_id": rare}, n // 10 - PAGE_SIZE),
                    ("model_id=common, middle", {"model_id": common}, n // 2),
                ]
                results = []
                for name, filters, position in cases:
                    token = token_at(session, tenant, position, **filters)
                    ms, ids = timed(session, tenant, token, args.repeats, **filters)
                    assert len(ids) == PAGE_SIZE, (name, len(ids))
                    results.append((name, ms))
            if args.database_url:  # a shared database: take the seeded rows out again
                with Session(engine) as session:
                    remove_seeded(session)
        finally:
            engine.dispose()
    backend = url.split(":", 1)[0].split("+", 1)[0]
    print(
        f"backend {backend}, {args.audits} audits of one tenant (+{args.audits // 10} of "
        f"another), seeded in {seeded:.1f} s; median of {args.repeats} runs of list_page"
    )
    for name, ms in results:
        print(f"  {name:36} {ms:8.2f} ms")
    first = results[0][1]
    deepest = max(ms for _, ms in results)
    print(f"slowest page / first page: {deepest / first:.2f}")


if __name__ == "__main__":
    main()
