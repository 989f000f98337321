"""Announcements of audit changes (service/db/audit_changes.py): what the workers' own functions
write is announced after the commit on Redis, with the audit and its tenant; a rollback
announces nothing; a statement that names no audit announces everything; a message that could
not be sent goes out with the next commit."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.db import lifecycle
from service.db.audit_changes import (
    AuditChanges,
    Publisher,
    announcing_sessionmaker,
    audit_ids_of,
    channel_name,
)
from service.db.migrate import upgrade_to_head
from service.db.session import make_engine
from service.db.tables import Audit, AuditShard, utcnow
from service.settings import Settings
from tests.service.conftest import REDIS_URL, make_settings
from workers.execution import leases, shard_leases


class Listener:
    """A subscriber to one channel, as a gateway is."""

    def __init__(self, channel: str) -> None:
        self.client = redis.Redis.from_url(REDIS_URL)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(channel)
        assert self.pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]

    def messages(self, wait: float = 0.3) -> list[dict[str, Any]]:
        """What arrived until `wait` seconds pass without a message."""
        found = []
        while (message := self.pubsub.get_message(timeout=wait)) is not None:
            if message["type"] == "message":
                found.append(json.loads(message["data"]))
        return found

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def channel_settings(tmp_path: Path, database_url: str, broker: redis.Redis) -> Settings:
    return make_settings(
        tmp_path, database_url, audit_changes_channel=f"test-changes-{uuid.uuid4().hex}"
    )


@pytest.fixture
def listener(channel_settings: Settings) -> Iterator[Listener]:
    heard = Listener(channel_name(channel_settings))
    yield heard
    heard.close()


@pytest.fixture
def worker_sessions(channel_settings: Settings) -> Iterator[sessionmaker[Session]]:
    """The sessions a worker makes (service.db.session.get_sessionmaker, its settings)."""
    channel_settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(channel_settings.resolved_database_url)
    engine = make_engine(channel_settings.resolved_database_url)
    yield announcing_sessionmaker(engine, channel_settings)
    engine.dispose()


def new_audit(sessions: sessionmaker[Session], **values: Any) -> tuple[str, str]:
    """A fresh tenant's queued audit: (audit id, tenant id)."""
    from benchmarks.poll_load import seed_rows

    with sessions() as session:
        _, audit_id = seed_rows(session, f"changes-{uuid.uuid4().hex[:8]}")
        audit = session.get(Audit, audit_id)
        assert audit is not None
        for name, value in values.items():
            setattr(audit, name, value)
        session.commit()
        return audit_id, audit.tenant_id


def test_the_workers_writes_are_announced_with_audit_and_tenant(
    worker_sessions: sessionmaker[Session], listener: Listener
) -> None:
    audit_id, tenant_id = new_audit(worker_sessions)
    assert listener.messages() == [{"audits": [[audit_id, tenant_id]]}]  # created
    owner = leases.new_owner()
    now = utcnow()
    with worker_sessions() as session:
        taken = lifecycle.acquire_lease(
            session, audit_id, owner, now=now, lease_seconds=30, max_attempts=3
        )
        assert taken is lifecycle.LeaseOutcome.ACQUIRED
        # one message per commit (acquire_lease commits once)
        assert listener.messages() == [{"audits": [[audit_id, tenant_id]]}]

        assert lifecycle.update_owned(
            session, audit_id, owner, **lifecycle.monotone_progress(0.25, check="noise")
        )
        assert lifecycle.renew_lease(session, audit_id, owner, now=now, lease_seconds=30)
        assert listener.messages() == [{"audits": [[audit_id, tenant_id]]}] * 2

        # a write that is rolled back (another owner) changes nothing and announces nothing
        assert not lifecycle.update_owned(session, audit_id, "someone-else", progress_message="x")
        assert listener.messages() == []

        # shards: planned (ORM rows), claimed, stored, counted
        queue = f"test-queue-{uuid.uuid4().hex[:8]}"
        session.add_all(
            AuditShard(audit_id=audit_id, shard_id=f"s{i}", queue=queue, position=i)
            for i in range(2)
        )
        session.execute(update(Audit).where(Audit.id == audit_id).values(shards_total=2))
        session.commit()
        claimed = shard_leases.claim_shard(session, queue, owner, now=now, lease_seconds=30)
        assert claimed is not None and claimed.audit_id == audit_id
        assert lifecycle.release_shard(
            session, audit_id, claimed.shard_id, owner, status="done", result={"v": 1}
        )
        assert lifecycle.count_progress(session, audit_id, now) == (1, 2)
        assert listener.messages() == [{"audits": [[audit_id, tenant_id]]}] * 4

        assert lifecycle.release_lease(
            session, audit_id, owner, status="succeeded", finished_at=now + timedelta(seconds=1)
        )
        assert listener.messages() == [{"audits": [[audit_id, tenant_id]]}]


def test_orm_changes_and_statements_without_an_audit_id(
    worker_sessions: sessionmaker[Session], listener: Listener
) -> None:
    first, tenant = new_audit(worker_sessions)
    second, other_tenant = new_audit(worker_sessions)
    listener.messages()
    with worker_sessions() as session:
        audit = session.get(Audit, first)
        assert audit is not None
        audit.status = "running"  # as tests and the plan step do: an ORM change
        session.execute(update(Audit).where(Audit.id.in_([second])).values(progress_message="m"))
        session.commit()
        [message] = listener.messages()
        assert sorted(message["audits"]) == sorted([[first, tenant], [second, other_tenant]])

        # the reconciler's kind of statement, had it no id term: every audit may have changed
        session.execute(
            update(Audit).where(Audit.status == "no-such-status").values(progress_message="never")
        )
        session.commit()
        assert listener.messages() == [{"all": True}]

        session.execute(update(Audit).where(Audit.id == first).values(progress_message="gone"))
        session.rollback()
        session.commit()  # nothing left to announce
        assert listener.messages() == []


def test_reading_the_audit_ids_of_a_statement() -> None:
    assert audit_ids_of(update(Audit).where(Audit.id == "a", Audit.status == "x")) == ["a"]
    assert audit_ids_of(update(AuditShard).where(AuditShard.audit_id.in_(["a", "b"]))) == [
        "a",
        "b",
    ]
    assert audit_ids_of(update(Audit).where(Audit.status == "queued")) is None
    # an id inside an OR does not restrict the statement to it
    from sqlalchemy import or_

    assert audit_ids_of(update(Audit).where(or_(Audit.id == "a", Audit.status == "x"))) is None
    assert AuditChanges.decode(b"not json").everything
    assert AuditChanges.decode(b'{"audits": [["a", null]]}').audits == {"a": None}


def test_a_message_that_could_not_be_sent_goes_out_with_the_next_commit(
    channel_settings: Settings, listener: Listener
) -> None:
    publisher = Publisher("redis://127.0.0.1:1/0", channel_name(channel_settings), timeout=0.2)
    started = time.monotonic()
    changes = AuditChanges()
    changes.add("aud_1", "ten_1")
    publisher.publish(changes)
    assert publisher.failed == 1 and publisher.sent == 0
    more = AuditChanges()
    more.add("aud_2", None)
    publisher.publish(more)  # within retry_seconds: not even tried, only kept
    assert publisher.failed == 1 and time.monotonic() - started < 1.0
    # Redis is back (here: the client pointed at it again), and the retry time is up
    publisher._client = redis.Redis.from_url(REDIS_URL)
    publisher._retry_at = 0.0
    publisher.publish(None)  # any commit, even one that changed no audit
    assert publisher.sent == 1
    assert listener.messages() == [{"audits": [["aud_1", "ten_1"], ["aud_2", None]]}]
    publisher.close()
