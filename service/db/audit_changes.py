"""Announcements of audit changes over Redis pub/sub, so that gateways can keep a poll's answer
until its audit changes (service/api/audit_feed.py; docs/architecture.md, "Polls the workers
keep fresh").

Every process that writes audits (the workers, the reconciler in their heartbeat thread, the
CLI, the gateway itself: a submit, a cancel) makes its sessions with `announce_changes`: each
statement or flush that touches the `audits` or `audit_shards` table of a session notes the
audit ids it names, and after the transaction commits one message names them all on the
channel `channel_name(settings)`:

    {"audits": [["<audit id>", "<tenant id>"], ...]}    the tenant: null where not found
    {"all": true}                                       a statement named no audit id

A rolled-back transaction announces nothing. Publishing never fails a write: a message that
cannot be sent is kept and sent with the next commit of that process (or a collapsed
`{"all": true}` once too many are waiting). Outside service/api/ so the workers may use it;
imports no torch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import redis
from sqlalchemy import event, select
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList

from service.db.tables import Audit, AuditShard
from service.settings import Settings

log = logging.getLogger(__name__)

CHANNEL_TEMPLATE = "tightrope:{db}:audit-changes"
# table → the column of it that names the audit
AUDIT_COLUMNS = {Audit.__tablename__: "id", AuditShard.__tablename__: "audit_id"}
_INFO_KEY = "tightrope.audit_changes"
PENDING_LIMIT = 10_000  # audits waiting to be announced before they collapse into "all"


REDIS_SCHEMES = ("redis", "rediss", "unix")


def announced(settings: Settings) -> bool:
    """Whether changes are announced at all: only over a Redis broker (with `filesystem://`,
    one host without Redis, there is nothing to announce on, and gateways keep polls for
    poll_cache_seconds only)."""
    return urlparse(settings.broker_url).scheme in REDIS_SCHEMES


def channel_name(settings: Settings) -> str:
    """The channel: `audit_changes_channel`, else one per Redis database of the broker URL
    (pub/sub channels are server-wide in Redis, not per database number)."""
    if settings.audit_changes_channel:
        return settings.audit_changes_channel
    path = urlparse(settings.broker_url).path.strip("/")
    return CHANNEL_TEMPLATE.format(db=path if path.isdigit() else "0")


@dataclass
class AuditChanges:
    """The audits one transaction (or several, waiting to be sent) changed: id → tenant id
    (None: not known yet, or not found); `everything`: some change named no id."""

    audits: dict[str, str | None] = field(default_factory=dict)
    everything: bool = False

    def __bool__(self) -> bool:
        return self.everything or bool(self.audits)

    def add(self, audit_id: str, tenant_id: str | None = None) -> None:
        if tenant_id is not None or audit_id not in self.audits:
            self.audits[audit_id] = tenant_id

    def merge(self, other: AuditChanges) -> None:
        self.everything = self.everything or other.everything
        for audit_id, tenant_id in other.audits.items():
            self.add(audit_id, tenant_id)

    def encode(self) -> bytes:
        if self.everything:
            return b'{"all": true}'
        return json.dumps({"audits": [[a, t] for a, t in self.audits.items()]}).encode()

    @classmethod
    def decode(cls, data: bytes | str) -> AuditChanges:
        """A message's changes; one that cannot be read counts as a change of everything."""
        try:
            body = json.loads(data)
            if body.get("all"):
                return cls(everything=True)
            changes = cls()
            for audit_id, tenant_id in body["audits"]:
                if not isinstance(audit_id, str) or not isinstance(tenant_id, (str, type(None))):
                    raise ValueError("not an audit id")
                changes.add(audit_id, tenant_id)
            return changes
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("an audit-change message that cannot be read: %r", data[:200])
            return cls(everything=True)


class Publisher:
    """Sends announcements (thread-safe, from whichever thread committed). A failed send is
    kept and retried with the next call from `retry_seconds` on, so that a Redis outage costs
    a commit at most one short timeout per `retry_seconds`."""

    def __init__(
        self, url: str, channel: str, timeout: float = 0.5, retry_seconds: float = 1.0
    ) -> None:
        self.channel = channel
        self.retry_seconds = retry_seconds
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._pending = AuditChanges()
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self.sent = 0
        self.failed = 0

    def publish(self, changes: AuditChanges | None) -> None:
        with self._lock:
            if changes:
                self._pending.merge(changes)
                if len(self._pending.audits) > PENDING_LIMIT:
                    self._pending = AuditChanges(everything=True)
            if not self._pending or time.monotonic() < self._retry_at:
                return
            message, self._pending = self._pending, AuditChanges()
            try:
                self._client.publish(self.channel, message.encode())
                self.sent += 1
            except redis.RedisError as exc:
                self.failed += 1
                message.merge(self._pending)  # nothing new can have come in: we hold the lock
                self._pending = message
                self._retry_at = time.monotonic() + self.retry_seconds
                log.warning(
                    "could not announce audit changes on %s (%s); retrying from %.1f s on",
                    self.channel,
                    exc,
                    self.retry_seconds,
                )

    def close(self) -> None:
        self._client.close()


# The tenant of each audit this process announced lately: an audit never changes tenant, so a
# worker that writes one audit's progress many times looks it up once.
_TENANTS: OrderedDict[str, str] = OrderedDict()
_TENANTS_MAX = 50_000
_TENANTS_LOCK = threading.Lock()


def _remember_tenant(audit_id: str, tenant_id: str) -> None:
    with _TENANTS_LOCK:
        _TENANTS[audit_id] = tenant_id
        _TENANTS.move_to_end(audit_id)
        while len(_TENANTS) > _TENANTS_MAX:
            _TENANTS.popitem(last=False)


def _known_tenant(audit_id: str) -> str | None:
    with _TENANTS_LOCK:
        return _TENANTS.get(audit_id)


def _changes(session: Session) -> AuditChanges:
    changes: AuditChanges = session.info.setdefault(_INFO_KEY, AuditChanges())
    return changes


def _conjuncts(clause: Any) -> Iterator[Any]:
    """The terms ANDed together at the top of a WHERE clause."""
    if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
        for term in clause.clauses:
            yield from _conjuncts(term)
    elif clause is not None:
        yield clause


def _bound_values(term: Any, table: str, column: str) -> list[str] | None:
    """The values `table.column` is restricted to by one term (`= :v`, `IN (:vs)`); None when
    the term is of another kind."""
    if not isinstance(term, BinaryExpression):
        return None
    if term.operator not in (operators.eq, operators.in_op):
        return None
    for named, bound in ((term.left, term.right), (term.right, term.left)):
        named_table = getattr(getattr(named, "table", None), "name", None)
        if named_table == table and getattr(named, "name", None) == column:
            if not isinstance(bound, BindParameter):
                return None  # a subquery, another column: not a list of ids
            value = bound.effective_value
            values = value if isinstance(value, (list, tuple)) else [value]
            if all(isinstance(v, str) for v in values):
                return list(values)
            return None
    return None


def audit_ids_of(statement: Any) -> list[str] | None:
    """The audits an UPDATE or DELETE of `audits` or `audit_shards` may change, read from its
    WHERE clause (an id term ANDed at its top); None when the clause names none (then any
    audit may have changed)."""
    table = getattr(getattr(statement, "table", None), "name", None)
    column = AUDIT_COLUMNS.get(table or "")
    if column is None:
        return None
    for term in _conjuncts(getattr(statement, "whereclause", None)):
        values = _bound_values(term, table or "", column)
        if values is not None:
            return values
    return None


def _on_execute(state: ORMExecuteState) -> None:
    if not (state.is_update or state.is_delete or state.is_insert):
        return
    table = getattr(getattr(state.statement, "table", None), "name", None)
    if table not in AUDIT_COLUMNS:
        return
    ids = None if state.is_insert else audit_ids_of(state.statement)
    changes = _changes(state.session)
    if ids is None:
        changes.everything = True
    else:
        for audit_id in ids:
            changes.add(audit_id, _known_tenant(audit_id))


def _on_flush(session: Session, _context: Any) -> None:
    touched = [*session.new, *session.dirty, *session.deleted]
    for obj in touched:
        if isinstance(obj, Audit) and obj.id is not None:
            _changes(session).add(obj.id, obj.tenant_id)
            if obj.tenant_id is not None:
                _remember_tenant(obj.id, obj.tenant_id)
        elif isinstance(obj, AuditShard) and obj.audit_id is not None:
            _changes(session).add(obj.audit_id, _known_tenant(obj.audit_id))


def _pending_rows(session: Session) -> bool:
    return any(
        isinstance(obj, (Audit, AuditShard))
        for obj in (*session.new, *session.dirty, *session.deleted)
    )


def _before_commit(session: Session) -> None:
    """Flush what is staged (the commit would), then look the tenants of the changed audits
    up inside the transaction: the gateways forget the audit-list pages of those tenants."""
    if _pending_rows(session):
        session.flush()
    changes = session.info.get(_INFO_KEY)
    if not changes:
        return
    missing = [audit_id for audit_id, tenant in changes.audits.items() if tenant is None]
    if not missing:
        return
    try:
        rows = session.execute(select(Audit.id, Audit.tenant_id).where(Audit.id.in_(missing)))
        for audit_id, tenant_id in rows:
            changes.add(audit_id, tenant_id)
            _remember_tenant(audit_id, tenant_id)
    except Exception:  # the announcement names no tenant: gateways then forget every list
        log.warning("could not look the tenants of changed audits up", exc_info=True)


def _after_rollback(session: Session) -> None:
    session.info.pop(_INFO_KEY, None)


def announce_changes(factory: sessionmaker[Session], publisher: Publisher) -> None:
    """Make every session of `factory` announce the audits its commits changed."""

    def after_commit(session: Session) -> None:
        changes = session.info.pop(_INFO_KEY, None)
        try:
            publisher.publish(changes)  # also a retry of what could not be sent before
        except Exception:  # never fail the caller's write
            log.warning("announcing audit changes failed", exc_info=True)

    event.listen(factory, "do_orm_execute", _on_execute)
    event.listen(factory, "after_flush", _on_flush)
    event.listen(factory, "before_commit", _before_commit)
    event.listen(factory, "after_commit", after_commit)
    event.listen(factory, "after_rollback", _after_rollback)


def announcing_sessionmaker(engine: Any, settings: Settings) -> sessionmaker[Session]:
    """A session factory over `engine` whose commits announce audit changes on the settings'
    channel (the workers' and the gateway's)."""
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    if announced(settings):
        announce_changes(factory, Publisher(settings.broker_url, channel_name(settings)))
    return factory
