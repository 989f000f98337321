"""What a poller sees of an audit is honest: its progress never goes backwards and its
`attempts` never drops back (a real audit through the real sandboxed runner, every committed
state recorded), and a time-limit failure names the limit that bound it, its value and its
source (fake runners that hang, on real databases)."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.orm import Session, sessionmaker

from service.db.audit_status import to_status
from service.db.lifecycle import monotone_progress
from service.db.tables import Audit, Model, utcnow
from service.settings import Settings
from tests.fixtures.model_factory import tiny_cnn_spec, tiny_cnn_torchscript
from tests.workers.conftest import REQUEST, add_audit, add_model
from tests.workers.execution.test_shard_job import CPU, planned_audit
from workers.execution.audit_job import Sends, execute_audit
from workers.execution.job_dir_cache import JobDirCache
from workers.execution.shard_job import execute_shard

pytestmark = pytest.mark.needs("bwrap")  # real sandboxed children


def _nothing(*args: object) -> None:
    return None


QUIET = Sends(audit=_nothing, shards=_nothing, callback=_nothing)


def _reload(session: Session, audit_id: str) -> Audit:
    row = session.get(Audit, audit_id, populate_existing=True)
    assert row is not None
    return row


def _set_progress(session: Session, audit_id: str, values: dict[str, Any]) -> None:
    session.execute(
        update(Audit)
        .where(Audit.id == audit_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def test_a_lower_progress_write_changes_nothing(settings: Settings, session: Session) -> None:
    """The store itself refuses to lower progress: a lower fraction keeps the stored fraction,
    check and message; an equal or higher one replaces them."""
    audit = add_audit(session, add_model(session, settings), status="running")
    _set_progress(session, audit.id, monotone_progress(0.75, check="lipschitz", message="late"))
    _set_progress(
        session,
        audit.id,
        monotone_progress(0.0, check="random_noise", message="preparing operator and images"),
    )
    row = _reload(session, audit.id)
    assert (row.progress_fraction, row.progress_check, row.progress_message) == (
        0.75,
        "lipschitz",
        "late",
    )
    _set_progress(session, audit.id, monotone_progress(0.75, message="same fraction"))
    _set_progress(session, audit.id, monotone_progress(1.0, check="worst_case", message="done"))
    row = _reload(session, audit.id)
    assert (row.progress_fraction, row.progress_check, row.progress_message) == (
        1.0,
        "worst_case",
        "done",
    )


@pytest.fixture
def tiny_model(settings: Settings, session: Session, tmp_path: Path) -> Model:
    blob = tiny_cnn_torchscript(tmp_path / "tiny.pt").read_bytes()
    model = add_model(session, settings, blob=blob, spec=tiny_cnn_spec(size=16))
    assert model.sha256 == hashlib.sha256(blob).hexdigest()
    return model


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_progress_and_attempts_never_go_back_through_a_real_audit(
    settings: Settings, sessions: sessionmaker[Session], session: Session, tiny_model: Model
) -> None:
    """Plan, the one shard, then the finalising step, each by the real runner: every state a
    poller could read (each commit of the worker's session) is recorded. The finalising runner
    starts counting from 0.0 ("preparing operator and images") and `attempts` restarts for the
    finalising step: neither may show through."""
    audit = add_audit(session, tiny_model)
    seen: list[tuple[float, int, str | None]] = []
    with sessions() as worker:

        @event.listens_for(worker, "after_commit")
        def record(_: Session) -> None:
            with sessions() as poller:
                row = poller.get(Audit, audit.id)
                assert row is not None
                view = to_status(row)
                state = (view.progress.fraction, view.attempts, view.progress.message)
                if not seen or seen[-1] != state:
                    seen.append(state)

        run = {"settings": settings, "session": worker, "sends": QUIET}
        assert execute_audit(audit.id, **run) == "planned"  # type: ignore[arg-type]
        cache = JobDirCache(1)
        try:
            assert execute_shard(audit.id, CPU, cache=cache, **run) == "done"  # type: ignore[arg-type]
        finally:
            cache.clear()
        assert execute_audit(audit.id, **run) == "succeeded", _reload(session, audit.id).error  # type: ignore[arg-type]

    fractions = [fraction for fraction, _, _ in seen]
    attempts = [count for _, count, _ in seen]
    assert fractions == sorted(fractions), seen
    assert fractions[-1] == 1.0
    assert attempts == sorted(attempts) and attempts[-1] == 1, seen  # nothing was retried
    messages = [message for _, _, message in seen]
    assert "1 shard planned" in messages, seen  # not "1 shards"
    assert "merging 1 shard into the report" in messages, seen
    assert messages[-1] == "report written"
    row = _reload(session, audit.id)
    assert to_status(row).attempts == 1 and row.progress_fraction == 1.0


def test_a_shard_out_of_budget_names_the_budget(settings: Settings, session: Session) -> None:
    """A shard of an audit with budget.wall_seconds runs out of what is left of it: the problem
    names the shard, the budget's value and that it is the audit's budget."""
    settings = settings.model_copy(update={"runner_module": "tests.workers.fakes.sleep"})
    request = dict(REQUEST, budget={"wall_seconds": 2.0})
    audit = planned_audit(session, add_model(session, settings), 1, request=request)
    cache = JobDirCache(0)
    assert execute_shard(audit.id, CPU, settings=settings, session=session, cache=cache) == (
        "failed"
    )
    row = _reload(session, audit.id)
    assert row.error is not None and row.error["type"].endswith("/time-limit")
    detail = row.error["detail"]
    assert detail.startswith("shard random_noise-0 timed out after "), detail
    assert "the audit's time limit is 2 s, set by the audit's budget.wall_seconds" in detail
    assert row.error["extra"] == {
        "limit_seconds": 2.0,
        "limit_source": "budget",
        "shard": "random_noise-0",
    }
    view = to_status(row)
    assert view.error is not None and view.error.instance == f"/v1/audits/{audit.id}"


def test_a_shard_out_of_the_default_limit_names_the_probe_time(
    settings: Settings, session: Session
) -> None:
    """Without a budget the limit is derived from the model's probe time: the problem says so,
    with the probe time and the settings it was derived with."""
    settings = settings.model_copy(
        update={"runner_module": "tests.workers.fakes.sleep", "audit_min_time_limit": 2}
    )
    audit = planned_audit(session, add_model(session, settings), 1, probe_seconds=0.00001)
    assert execute_shard(
        audit.id, CPU, settings=settings, session=session, cache=JobDirCache(0)
    ) == ("failed")
    row = _reload(session, audit.id)
    assert row.error is not None
    detail = row.error["detail"]
    assert "timed out after" in detail and "the audit's time limit is 2 s" in detail, detail
    assert "derived from the model's probe time: 1e-05 s" in detail, detail
    assert "TIGHTROPE_AUDIT_MIN_TIME_LIMIT (2 s)" in detail and "budget.wall_seconds" in detail
    assert row.error["extra"]["limit_source"] == "default"
    assert row.error["extra"]["limit_seconds"] == 2.0


def test_a_shard_that_finds_the_budget_spent_names_it(settings: Settings, session: Session) -> None:
    request = dict(REQUEST, budget={"wall_seconds": 30.0})
    audit = planned_audit(
        session,
        add_model(session, settings),
        1,
        request=request,
        started_at=utcnow() - timedelta(seconds=60),
    )
    assert execute_shard(
        audit.id, CPU, settings=settings, session=session, cache=JobDirCache(0)
    ) == ("failed")
    row = _reload(session, audit.id)
    assert row.error is not None and row.error["type"].endswith("/time-limit")
    assert row.error["detail"].startswith(
        "shard random_noise-0 could not start: the audit had used up its time limit; "
        "the audit's time limit is 30 s, set by the audit's budget.wall_seconds"
    ), row.error["detail"]
    assert row.error["extra"]["limit_source"] == "budget"
