"""Models that never return or ask for endless memory, through the real sandboxed runner: each
costs one short probe timeout (or one probe) and is reported as the model's fault, never holding
a worker for the audit's hour."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from service.db.tables import Audit, Model
from service.settings import Settings
from tests.fixtures.hostile_models import (
    allocates_without_end_torchscript,
    never_returns_torchscript,
)
from tests.workers.conftest import REQUEST, add_audit, add_model
from workers.execution.admission_job import execute_admission
from workers.execution.audit_job import execute_audit

pytestmark = pytest.mark.needs("bwrap")  # the real sandboxed runner

PROBE_LIMIT = 15  # seconds: the probe budget in these tests (default 60), child start-up included
MEASUREMENT_SPEC = {
    "name": "hostile",
    "task": "reconstruction",
    "input": "measurement",
    "image_shape": [1, 16, 16],
    "value_range": [0.0, 1.0],
}
GAUSSIAN = {"kind": "gaussian", "m": 64}
AUDIT = dict(REQUEST, operator=GAUSSIAN)


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """One database: what is tested is the sandbox and the budgets, not the persistence."""
    return sqlite_url


def _admitted(session: Session, settings: Settings, blob: bytes, spec: dict[str, object]) -> Model:
    model = add_model(session, settings, status="validating", blob=blob, spec=spec)
    execute_admission(model.id, settings=settings, session=session)
    row = session.get(Model, model.id, populate_existing=True)
    assert row is not None
    return row


def _probe_limited(settings: Settings) -> Settings:
    return settings.model_copy(update={"admission_time_limit": PROBE_LIMIT})


# Alone (serial): its admission must start a cold runner, import torch and load the model
# within PROBE_LIMIT, which two loaded test processes on 2 cores once made it miss.
@pytest.mark.serial
def test_a_hung_measurement_model_costs_its_audit_one_probe_timeout(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    """No operator in the spec: admitted with the probe deferred (and said so); its audit's plan
    step probes it through the audit's operator and gives up after the probe's budget."""
    settings = _probe_limited(settings)
    blob = never_returns_torchscript(tmp_path / "loop.pt").read_bytes()
    model = _admitted(session, settings, blob, MEASUREMENT_SPEC)
    assert model.status == "ready", model.reason
    assert (model.admission_info or {}).get("probe") == "deferred"
    assert "first audit" in (model.admission_info or {}).get("probe_note", "")

    audit = add_audit(session, model, request=AUDIT)
    started = time.monotonic()
    assert execute_audit(audit.id, settings=settings, session=session) == "failed"
    assert time.monotonic() - started < PROBE_LIMIT + 20  # not the soft limit's hour
    row = session.get(Audit, audit.id, populate_existing=True)
    assert row is not None and row.error is not None
    assert row.error["type"].endswith("/time-limit") and row.error["status"] == 422
    assert f"within {PROBE_LIMIT} s" in row.error["detail"] and "probe" in row.error["detail"]
    assert row.shards_total == 0  # nothing was planned, nothing else was held


def test_a_hung_model_whose_spec_names_its_operator_is_rejected_at_upload(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    settings = _probe_limited(settings)
    blob = never_returns_torchscript(tmp_path / "loop.pt").read_bytes()
    started = time.monotonic()
    model = _admitted(session, settings, blob, dict(MEASUREMENT_SPEC, operator=GAUSSIAN))
    assert time.monotonic() - started < PROBE_LIMIT + 20
    assert model.status == "rejected"
    assert (model.reason or "").startswith(f"timed out after {PROBE_LIMIT} s")


def test_a_memory_hog_fails_its_audit_with_a_reason_that_names_the_model(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    blob = allocates_without_end_torchscript(tmp_path / "hog.pt").read_bytes()
    # As admitted (the probe deferred: nothing ran it at upload), without paying for a child.
    model = add_model(session, settings, blob=blob, spec=MEASUREMENT_SPEC)

    audit = add_audit(session, model, request=AUDIT)
    assert execute_audit(audit.id, settings=settings, session=session) == "failed"
    row = session.get(Audit, audit.id, populate_existing=True)
    assert row is not None and row.error is not None
    assert row.error["type"].endswith("/model-failed") and row.error["status"] == 422
    assert "the model ran out of memory on a probe of 2 inputs" in row.error["detail"]
    assert "fewer" not in row.error["detail"]  # nothing about the user's audit size
