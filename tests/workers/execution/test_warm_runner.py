"""The warm runner (workers/execution/warm_runner.py), with the real runner in the real sandbox:
a spare that has imported the engine runs the next job in its own directory, a new spare is
started for the job after, a spare started differently is not used, and a dead spare costs a
cold start, never the job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from service.db.tables import Model
from service.settings import Settings
from tests.fixtures import model_factory as mf
from tests.workers.conftest import add_model
from workers.execution import warm_runner
from workers.execution.admission_job import execute_admission

pytestmark = [
    pytest.mark.needs("bwrap"),
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]


@pytest.fixture
def keeping(settings: Settings) -> Iterator[None]:
    """This process keeps a spare, as a worker does from its start; none is left after."""
    yield
    warm_runner.end_spare(stop_keeping=True)


def _identity_model(session: Session, settings: Settings, tmp_path: Path) -> Model:
    blob = mf.identity_torchscript(tmp_path / "identity.pt").read_bytes()
    return add_model(session, settings, status="validating", blob=blob, spec=mf.identity_spec())


def _spare_dir() -> Path:
    spare = warm_runner._spare
    assert spare is not None and spare.alive()
    return spare.job_dir


def test_a_spare_runs_the_next_job_in_its_own_directory_and_is_replaced(
    settings: Settings, session: Session, tmp_path: Path, keeping: None
) -> None:
    warm_runner.start_spare(settings)
    first = _spare_dir()
    assert first.parent == settings.jobs_dir and list(first.iterdir()) == []  # empty, its own
    used = warm_runner.spares_used

    model = _identity_model(session, settings, tmp_path)
    assert execute_admission(model.id, settings=settings, session=session) == "ready"

    assert warm_runner.spares_used == used + 1
    second = _spare_dir()  # a new spare waits for the next job
    assert second != first
    # the job's directory and the used spare's are gone; only the new spare's is left
    assert sorted(settings.jobs_dir.iterdir()) == [second]


def test_without_a_spare_a_job_starts_cold_and_a_process_that_keeps_none_starts_none(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    used = warm_runner.spares_used
    model = _identity_model(session, settings, tmp_path)
    assert execute_admission(model.id, settings=settings, session=session) == "ready"
    assert warm_runner.spares_used == used
    assert warm_runner._spare is None
    assert list(settings.jobs_dir.iterdir()) == []


def test_a_spare_started_differently_is_not_used_and_stays(
    settings: Settings, session: Session, tmp_path: Path, keeping: None
) -> None:
    # a spare of another data directory: its sandbox hides another directory
    other = settings.model_copy(update={"data_dir": tmp_path / "other"})
    warm_runner.start_spare(other)
    kept = _spare_dir()
    used = warm_runner.spares_used

    model = _identity_model(session, settings, tmp_path)
    assert execute_admission(model.id, settings=settings, session=session) == "ready"
    assert warm_runner.spares_used == used
    assert _spare_dir() == kept


def test_a_dead_spare_costs_a_cold_start_not_the_job(
    settings: Settings, session: Session, tmp_path: Path, keeping: None
) -> None:
    warm_runner.start_spare(settings)
    spare = warm_runner._spare
    assert spare is not None
    spare.kill()
    spare.finish()
    used = warm_runner.spares_used

    model = _identity_model(session, settings, tmp_path)
    assert execute_admission(model.id, settings=settings, session=session) == "ready"
    assert warm_runner.spares_used == used
    assert _spare_dir() != spare.job_dir and not spare.job_dir.exists()


def test_no_spare_when_warm_runners_are_off_or_the_runner_is_not_the_real_one(
    settings: Settings, keeping: None
) -> None:
    warm_runner.start_spare(settings.model_copy(update={"warm_runner": False}))
    assert warm_runner._spare is None
    warm_runner.start_spare(
        settings.model_copy(update={"runner_module": "tests.workers.fakes.sleep"})
    )
    assert warm_runner._spare is None


def test_a_step_that_replaces_its_spare_itself_gets_none_started_meanwhile(
    settings: Settings, keeping: None
) -> None:
    """The finalising step (replace_spare=False) starts the next spare once it is done: none
    imports torch beside its signing and rendering."""
    warm_runner.start_spare(settings)
    first = _spare_dir()
    job_dir = settings.jobs_dir / "job"
    job_dir.mkdir()
    child = warm_runner.start_runner(
        settings,
        warm_runner.default_sandbox(settings),
        job_dir,
        time_limit=60,
        use_gpu=False,
        replace_spare=False,
    )
    try:
        assert child.job_dir == first and warm_runner._spare is None
    finally:
        child.kill()
        child.finish()
    warm_runner.replace_spare(settings)
    assert _spare_dir() != first


def test_a_process_that_keeps_no_spare_starts_none_after_a_job(settings: Settings) -> None:
    warm_runner.replace_spare(settings)
    assert warm_runner._spare is None
