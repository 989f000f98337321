"""An endpoint model's audit shares one query budget among its steps, wherever they run: the
plan, every shard (on any worker, at the same time) and the finalising step draw from a counter
on the audit's row (`audits.queries_drawn`), by atomic conditional updates, so that together
they never send more than the budget, and a shard that needs many queries (a worst-case
search) is not held to the share of one that needs few (random noise).

A step draws in chunks (DRAW_CHUNK inputs at a time, or what one request needs), not per
request, so the database sees a write every thousand inputs or so; what a step drew and did
not send is given back when it ends. A step whose worker dies keeps its last chunk drawn: the
budget errs on the side of the vendor (fewer queries), never more.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.db.lifecycle import draw_queries, give_back_queries

log = logging.getLogger(__name__)

DRAW_CHUNK = 1024


class AuditQueryBudget:
    """A BudgetSource (workers.shared.query_ledger) on the audit's row. Its own session (the
    endpoint client's threads draw while the step's thread renews its lease)."""

    def __init__(self, engine: Engine, audit_id: str, total: int) -> None:
        self._engine = engine
        self.audit_id = audit_id
        self.total = total

    def _draw(self, inputs: int) -> bool:
        with Session(self._engine) as session:
            return draw_queries(session, self.audit_id, inputs, self.total)

    def take(self, inputs: int) -> int:
        for amount in (max(inputs, DRAW_CHUNK), inputs):
            if self._draw(amount):
                return amount
        return 0

    def give_back(self, inputs: int) -> None:
        if inputs <= 0:
            return
        try:
            with Session(self._engine) as session:
                give_back_queries(session, self.audit_id, inputs)
        except Exception:  # noqa: BLE001 - kept drawn: the budget errs on the vendor's side
            log.warning("audit %s: could not give back %d undrawn queries", self.audit_id, inputs)
