"""The one loop that follows a runner child (workers.execution.steps.follow_child), on a fake
child and a fake clock: it ticks at most every second, beats every heartbeat_seconds while the
step holds a lease, ends at once when the step is done or a beat says stop, and kills a child
asked to stop ("wind down") once the grace has passed, not before."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from schemas.runner import RunnerEvent
from workers.execution import steps
from workers.execution.steps import AfterBeat, follow_child

STEP_SECONDS = 0.5  # the fake clock's advance per event or tick


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeChild:
    clock: Clock
    events_left: int = 40
    killed_at: list[float] = field(default_factory=list)
    tick_seconds: float | None = None

    def events(self, tick_seconds: float) -> Iterator[RunnerEvent | None]:
        self.tick_seconds = tick_seconds
        for _ in range(self.events_left):
            self.clock.now += STEP_SECONDS
            yield None

    def kill(self) -> None:
        self.killed_at.append(self.clock.now)


@dataclass
class Step:
    clock: Clock
    done_after: int | None = None  # on_event says done at this call
    after_beat: list[AfterBeat] = field(default_factory=list)
    holds_lease: bool = True
    seen: int = 0
    beats: list[float] = field(default_factory=list)

    def on_event(self, event: RunnerEvent | None) -> bool:
        self.seen += 1
        return self.done_after is not None and self.seen >= self.done_after

    def beat_due(self) -> bool:
        return self.holds_lease

    def beat(self, child: object) -> AfterBeat:
        self.beats.append(self.clock.now)
        return self.after_beat.pop(0) if self.after_beat else "go on"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(steps.time, "monotonic", fake)
    return fake


def _follow(child: FakeChild, step: Step, heartbeat: float = 2.0, grace: float = 0.0) -> None:
    follow_child(
        child,  # type: ignore[arg-type]
        step,
        heartbeat_seconds=heartbeat,
        stop_grace_seconds=grace,
    )


def test_it_beats_every_heartbeat_until_the_child_ends(clock: Clock) -> None:
    child, step = FakeChild(clock, events_left=10), Step(clock)
    _follow(child, step, heartbeat=2.0)
    assert child.tick_seconds == 1.0  # wakes at least every second
    assert step.seen == 10 and step.beats == [102.0, 104.0]
    assert child.killed_at == []  # the caller decides what becomes of an ended child


def test_a_short_heartbeat_is_the_tick(clock: Clock) -> None:
    child = FakeChild(clock, events_left=2)
    _follow(child, Step(clock), heartbeat=0.25)
    assert child.tick_seconds == 0.25


def test_it_ends_at_once_when_the_step_is_done(clock: Clock) -> None:
    child, step = FakeChild(clock), Step(clock, done_after=3)
    _follow(child, step, heartbeat=0.5)
    assert step.seen == 3 and step.beats == [100.5, 101.0]  # no beat after the last event
    assert child.killed_at == []


def test_a_beat_that_says_stop_ends_following_without_a_kill(clock: Clock) -> None:
    child, step = FakeChild(clock), Step(clock, after_beat=["go on", "stop"])
    _follow(child, step, heartbeat=1.0)
    assert step.beats == [101.0, 102.0] and step.seen == 4
    assert child.killed_at == []


def test_a_child_asked_to_wind_down_is_killed_after_the_grace(clock: Clock) -> None:
    child, step = FakeChild(clock), Step(clock, after_beat=["wind down"])
    _follow(child, step, heartbeat=1.0, grace=2.0)
    # asked at 101.0 (the first beat); beats go on meanwhile; killed once 2 s have passed
    assert step.beats == [101.0, 102.0, 103.0]
    assert child.killed_at == [103.0]


def test_a_step_without_a_lease_never_beats(clock: Clock) -> None:
    child, step = FakeChild(clock, events_left=10), Step(clock, holds_lease=False)
    _follow(child, step, heartbeat=1.0)
    assert step.beats == [] and step.seen == 10
