"""The watchdog of a runner, with real sandboxed children (fake runner modules): silence kills
the child and says so; a child that beats lives on. And the real runner's beat: silent only
while one call of the model runs without returning."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from service.settings import Settings
from workers.engine.liveness import ModelCalls
from workers.execution.steps import sandbox_for
from workers.sandbox.child import RunnerChild, StallLimit
from workers.sandbox.runner import Beats, EventStream


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def _run(settings: Settings, module: str, job_dir: Path, stall_limit: StallLimit) -> RunnerChild:
    job_dir.mkdir()
    return RunnerChild(
        sandbox_for(settings, "torchscript"),
        module,
        job_dir,
        time_limit=60,
        use_gpu=False,
        stall_limit=stall_limit,
    )


@pytest.mark.needs("bwrap")
def test_a_silent_child_is_killed_by_the_watchdog_not_by_the_time_limit(
    settings: Settings, tmp_path: Path
) -> None:
    child = _run(settings, "tests.workers.fakes.sleep", tmp_path / "job", StallLimit(2.0))
    events = [e for e in child.events(tick_seconds=0.5) if e is not None]
    outcome = child.finish()
    assert [e.event for e in events] == ["progress"]
    assert 2.0 <= time.monotonic() - child.started < 15
    assert outcome.stalled and outcome.killed and not outcome.timed_out
    assert outcome.stall_seconds == 2.0


@pytest.mark.needs("bwrap")
def test_the_watchdog_counts_from_the_runners_first_line_not_from_its_start(
    settings: Settings, tmp_path: Path
) -> None:
    """Before its first line a runner runs only our own code (imports, which a busy machine can
    slow past the floor): 3 s of silence then is no stall, with an allowance of 1 s."""
    child = _run(settings, "tests.workers.fakes.slow_start", tmp_path / "job", StallLimit(1.0))
    events = [e for e in child.events(tick_seconds=0.5) if e is not None]
    outcome = child.finish()
    assert [e.event for e in events] == ["progress", "done"]
    assert outcome.returncode == 0 and not outcome.stalled and not outcome.killed


@pytest.mark.needs("bwrap")
def test_a_child_that_beats_outlives_the_watchdogs_time(settings: Settings, tmp_path: Path) -> None:
    child = _run(settings, "tests.workers.fakes.beats", tmp_path / "job", StallLimit(1.5, 0.5))
    events = list(child.events(tick_seconds=0.5))
    outcome = child.finish()
    assert [e.event for e in events if e is not None] == ["done"]  # beats come as ticks
    assert events.count(None) >= 10
    assert outcome.returncode == 0 and not outcome.stalled and not outcome.killed
    # the allowance grows with the largest batch the model was called on: 0.5 s × 8
    assert (outcome.largest_batch, outcome.stall_seconds) == (8, 4.0)


def test_the_runner_beats_unless_one_model_call_runs_since_its_last_beat() -> None:
    stream = io.StringIO()
    calls = ModelCalls()

    def beats() -> int:
        return len([line for line in stream.getvalue().splitlines() if '"beat"' in line])

    with Beats(EventStream(stream), interval=0.05, calls=calls):
        time.sleep(0.5)
        assert beats() >= 3  # working outside the model: beats
        with calls.running():  # one call that does not return
            time.sleep(0.1)
            before = beats()
            time.sleep(0.5)
            assert beats() == before
        time.sleep(0.3)
        assert beats() > before  # it returned: beats again
        quiet_since = beats()
        for _ in range(20):  # many short calls: each one that returned is progress
            with calls.running():
                time.sleep(0.04)
        assert beats() > quiet_since
        larger = beats()
        with calls.running(batch=64):  # a call on a larger batch than any before: said at once
            assert beats() >= larger + 1
            assert json.loads(stream.getvalue().splitlines()[-1])["info"]["largest_batch"] == 64
    last = json.loads(stream.getvalue().splitlines()[-1])
    assert last["event"] == "beat" and last["info"]["largest_batch"] == 64
