"""An endpoint model's audit through the worker's steps, in process, with real sandboxed runners:
the plan, the shards and the finalising step each relay their queries through the worker
(workers.execution.query_relay) to the project's fault-injecting endpoint serving a linear map
of known singular values. The ledger in the report counts exactly what the endpoint answered;
a failing endpoint and a spent budget fail the audit with their named problems."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from schemas.endpoints import EndpointLimits, EndpointRegistration
from schemas.model_spec import ModelSpec
from service.db.session import make_engine
from service.db.tables import Audit, AuditShard, Base, Model, Tenant
from service.domain.resource_rules import new_endpoint_model
from service.settings import Settings
from service.storage.stores import artifact_store
from tests.fixtures.oip_server import Fault, LinearModel, OIPServer
from tests.workers.conftest import add_audit
from tests.workers.execution.test_audit_job import Recorded
from workers.execution.admission_job import execute_admission
from workers.execution.audit_job import execute_audit
from workers.execution.job_dir_cache import JobDirCache
from workers.execution.shard_job import execute_shard

pytestmark = pytest.mark.needs("bwrap")  # real sandboxed runners

SHAPE = (1, 8, 8)
SPEC = ModelSpec(name="linear", task="reconstruction", input="measurement", image_shape=SHAPE)
CPU = "tightrope.cpu"
FAST = EndpointLimits(requests_per_second=1000, concurrency=4, timeout_seconds=10, max_batch=512)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "data").mkdir()
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        endpoint_allow="127.0.0.1",
        lease_seconds=30.0,
        heartbeat_seconds=0.5,
        max_attempts=1,
    )


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    engine = make_engine(settings.resolved_database_url)
    Base.metadata.create_all(engine)
    with sessionmaker(engine, expire_on_commit=False)() as opened:
        yield opened
    engine.dispose()


def endpoint_model(session: Session, settings: Settings, server: OIPServer) -> Model:
    tenant = Tenant(name="vendor")
    session.add(tenant)
    session.flush()
    registration = EndpointRegistration(
        url=server.url, model_name=server.name, spec=SPEC, limits=FAST
    )
    model = new_endpoint_model(tenant, registration, settings)
    session.add(model)
    session.commit()
    assert execute_admission(model.id, settings=settings, session=session) == "ready"
    session.expire_all()  # the admission wrote its row with an UPDATE of its own
    return model


def audit_request(checks: list[dict[str, Any]], **budget: Any) -> dict[str, Any]:
    return {
        "model_id": "filled-in",
        "dataset": {"builtin": "shepp_logan", "count": 2, "size": 8, "seed": 0},
        "operator": {"kind": "denoising"},
        "noise_level": 0.0,
        "checks": checks,
        "seed": 0,
        "device": "cpu",
        "budget": {"images_per_shard": 1, **budget},
    }


def run_shards(
    session: Session, settings: Settings, audit_id: str, sends: Recorded, at_most: int = 1000
) -> list[str]:
    """Run the audit's waiting shards (at most `at_most`) as one worker would, its runner kept
    between them; what each run returned."""
    cache = JobDirCache(capacity=2)
    ran: list[str] = []
    try:
        while len(ran) < at_most:
            ran.append(
                execute_shard(
                    audit_id, CPU, settings=settings, session=session, sends=sends, cache=cache
                )
            )
            if ran[-1] != "done":
                break
    finally:
        cache.drop_child()
        cache.clear()
    session.expire_all()  # (each task of a worker has a session of its own)
    return ran


def run_audit(session: Session, settings: Settings, audit_id: str) -> str:
    """Plan, every shard, finalise: as workers would, one step at a time."""
    sends = Recorded()
    outcome = execute_audit(audit_id, settings=settings, session=session, sends=sends)
    if outcome != "planned":
        return outcome
    run_shards(session, settings, audit_id, sends)
    audit = session.get(Audit, audit_id, populate_existing=True)
    assert audit is not None
    if audit.status != "running":
        return audit.status
    return execute_audit(audit_id, settings=settings, session=session, sends=sends)


def stored_report(settings: Settings, audit_id: str) -> dict[str, Any]:
    store = artifact_store(settings)
    return json.loads(store.read_bytes(f"{audit_id}/report.json"))


def answered_inputs(server: OIPServer) -> int:
    return sum(seen.batch for seen in server.requests if seen.path.endswith("/infer"))


def test_an_endpoint_audit_runs_query_only_and_its_ledger_is_exact(
    session: Session, settings: Settings
) -> None:
    linear = LinearModel(SHAPE, SHAPE, [2.0, 1.0, 0.5], seed=3)
    with OIPServer(linear, SHAPE, SHAPE) as server:
        model = endpoint_model(session, settings, server)
        admitted = answered_inputs(server)
        # (the query-only worst case runs end to end in tests/integration/test_endpoint_audit.py)
        checks = [
            {"kind": "random_noise", "levels": [0.05], "samples": 2},
            {"kind": "false_negative", "placements": 2},
        ]
        audit = add_audit(session, model, request=audit_request(checks))
        outcome = run_audit(session, settings, audit.id)
        failed = session.get(Audit, audit.id, populate_existing=True)
        assert outcome == "succeeded", failed.error if failed else None
        served = answered_inputs(server) - admitted
    row = session.get(Audit, audit.id, populate_existing=True)
    assert row is not None and row.status == "succeeded", row.error
    report = stored_report(settings, audit.id)
    queries = report["queries"]
    assert queries["query_only"] is True
    # every input the endpoint answered for this audit is in the ledger, once
    assert queries["sent"] == queries["answered"] == served > 0
    assert queries["failures"] == 0 and queries["budget"] == settings.endpoint_query_budget
    checks_charged = {row["check"] for row in queries["by_check"]}
    assert {"random_noise", "false_negative", "probe"} <= checks_charged
    assert report["model"]["endpoint"] == {
        "url": server.url,
        "model_name": server.name,
        "model_version": None,
    }
    shards = session.scalars(select(AuditShard).where(AuditShard.audit_id == audit.id)).all()
    assert len(shards) >= 2 and all("queries" in (s.result or {}) for s in shards)
    assert "latencies_seconds" not in queries  # kept in the shards' results only
    # the budget the steps drew covers what they sent; what they drew and did not send went back
    assert queries["sent"] <= queries["drawn"] == row.queries_drawn
    assert queries["drawn"] == queries["sent"]
    by_shard = {entry["shard"]: entry for entry in queries["by_shard"]}
    assert set(by_shard) == {s.shard_id for s in shards}
    # the plan's probe and the shards' queries, the finalising step's (its detection) the rest
    assert row.plan_queries is not None and row.plan_queries["sent"] > 0
    in_steps = sum(e["sent"] for e in by_shard.values()) + row.plan_queries["sent"]
    assert 0 < served - in_steps <= 64
    assert sorted(
        i for e in by_shard.values() if e["check"] == "random_noise" for i in e["images"]
    ) == [0, 1]


def test_an_endpoint_that_keeps_failing_fails_the_audit_with_endpoint_unavailable(
    session: Session, settings: Settings
) -> None:
    linear = LinearModel(SHAPE, SHAPE, [1.0], seed=1)
    with OIPServer(linear, SHAPE, SHAPE) as server:
        model = endpoint_model(session, settings, server)
        audit = add_audit(
            session,
            model,
            request=audit_request([{"kind": "random_noise", "levels": [0.05], "samples": 2}]),
        )
        server.fail(*[Fault.status_code(500)] * 200)
        outcome = run_audit(session, settings, audit.id)
    row = session.get(Audit, audit.id, populate_existing=True)
    assert row is not None and outcome == "failed" and row.status == "failed"
    assert row.error is not None and row.error["type"].endswith("/endpoint-unavailable")
    assert "500" in row.error["detail"]


def test_an_audit_that_spends_its_budget_fails_instead_of_passing(
    session: Session, settings: Settings
) -> None:
    linear = LinearModel(SHAPE, SHAPE, [1.0], seed=1)
    with OIPServer(linear, SHAPE, SHAPE) as server:
        model = endpoint_model(session, settings, server)
        audit = add_audit(
            session,
            model,
            request=audit_request([{"kind": "worst_case", "levels": [0.05]}], queries=200),
        )
        outcome = run_audit(session, settings, audit.id)
    row = session.get(Audit, audit.id, populate_existing=True)
    assert row is not None and outcome == "failed"
    assert row.error is not None and row.error["type"].endswith("/query-budget-exhausted")
    assert "budget of" in row.error["detail"]


def test_a_shard_run_again_is_counted_once_in_the_ledger_and_its_cost_in_drawn(
    session: Session, settings: Settings
) -> None:
    """A worker died after its shard's queries (its result lost): the shard runs again. The
    report's ledger holds the queries of the run whose result it used, once; `drawn` holds
    both runs' (the vendor answered both)."""
    linear = LinearModel(SHAPE, SHAPE, [1.5, 1.0], seed=2)
    with OIPServer(linear, SHAPE, SHAPE) as server:
        model = endpoint_model(session, settings, server)
        checks = [{"kind": "random_noise", "levels": [0.05, 0.1], "samples": 3}]
        audit = add_audit(session, model, request=audit_request(checks))
        sends = Recorded()
        assert execute_audit(audit.id, settings=settings, session=session, sends=sends) == "planned"
        assert run_shards(session, settings, audit.id, sends, at_most=1) == ["done"]
        (lost,) = session.scalars(
            select(AuditShard).where(AuditShard.audit_id == audit.id, AuditShard.status == "done")
        ).all()
        lost_sent = lost.result["queries"]["sent"]
        # what the reconciler does for a shard whose worker died before its result was kept
        lost.status, lost.result, lost.lease_owner = "queued", None, None
        session.commit()
        assert run_shards(session, settings, audit.id, sends) == ["done", "done", "idle"]
        assert execute_audit(audit.id, settings=settings, session=session, sends=sends) == (
            "succeeded"
        )
        served = answered_inputs(server)
    queries = stored_report(settings, audit.id)["queries"]
    row = session.get(Audit, audit.id, populate_existing=True)
    assert row is not None
    assert queries["drawn"] == row.queries_drawn == queries["sent"] + lost_sent
    by_shard = {entry["shard"]: entry["sent"] for entry in queries["by_shard"]}
    assert by_shard[lost.shard_id] == lost_sent  # the same shard, the same queries, once
    admission = 2 * 2  # the admission's probe: two calls of PROBE_BATCH inputs, in no audit
    assert served == admission + queries["sent"] + lost_sent
