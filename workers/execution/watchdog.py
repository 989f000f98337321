"""The watchdog of a shard: how long its runner may stay silent, and what the audit is told when
that runs out (docs/security.md, "Hung models").

The runner writes a `beat` event every second while it works, except while one call of the
model has been running since its last beat without returning, and says the largest batch it
called the model on (workers.sandbox.runner); the worker kills a runner that writes nothing for
longer than the allowance (workers.sandbox.child):

    allowance = max(watchdog_min_seconds,
                    watchdog_probe_multiple × probe time per input × largest batch)

The probe time per input is the admission probe's second, warm call (one forward and input
gradient on 2 inputs) divided by 2; the first call also pays one-off costs (TorchScript
optimises its first calls), so it is used only where no warm call was measured (models admitted
before it was, or whose probe waited for their first audit). A model that loops for ever on a
batch of 3 so frees its worker after the floor (30 s by default), not after the audit's time
limit, which stays the backstop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas import problem as problems
from schemas.runner import PROBE_BATCH
from service.settings import Settings
from workers.sandbox.child import StallLimit


@dataclass(frozen=True)
class ProbeTime:
    seconds_per_input: float
    source: str  # what was measured, for the problem's detail


@dataclass(frozen=True)
class Watchdog:
    limit: StallLimit
    probe: ProbeTime | None
    multiple: float

    def basis(self, largest_batch: int) -> str:
        """How the allowance was reached, for the problem's detail and the logs."""
        floor = f"at least {self.limit.floor:g} s"
        if self.probe is None:
            return f"no probe time of the model is known, so the floor of {self.limit.floor:g} s"
        batch = max(largest_batch, 1)
        per_input = f"{self.probe.seconds_per_input:.3g} s per input ({self.probe.source})"
        inputs = f"{batch} input{'s' if batch != 1 else ''}"
        return f"{self.multiple:g} × {per_input} × {inputs}, {floor}"


def probe_time(
    admission_info: dict[str, Any] | None, audit_probe_seconds: float | None
) -> ProbeTime | None:
    """The model's probe time per input: the admission's warm call; else the slowest first
    call measured (the admission's or the audit's plan step's); None when none was."""
    info = admission_info or {}
    warm = _seconds(info.get("probe_warm_seconds"))
    if warm is not None:
        return ProbeTime(warm / PROBE_BATCH, "the probe's second call")
    first = [
        t
        for t in (_seconds(info.get("probe_seconds")), _seconds(audit_probe_seconds))
        if t is not None
    ]
    if first:
        return ProbeTime(max(first) / PROBE_BATCH, "the probe's first call")
    return None


def _seconds(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def watchdog_for(settings: Settings, probe: ProbeTime | None) -> Watchdog:
    multiple = settings.watchdog_probe_multiple
    per_input = 0.0 if probe is None else multiple * probe.seconds_per_input
    return Watchdog(StallLimit(settings.watchdog_min_seconds, per_input), probe, multiple)


def hung_problem(
    watchdog: Watchdog, shard_id: str, allowed: float, largest_batch: int
) -> dict[str, Any]:
    """The problem of an audit whose shard the watchdog stopped: the model's fault (422)."""
    return problems.MODEL_HUNG.document(
        f"shard {shard_id}: a call of the model made no progress for {allowed:g} s, the "
        f"most the watchdog allows ({watchdog.basis(largest_batch)}): the model hangs, or "
        "is far slower on the audit's inputs than on its probe; its runner was stopped so "
        "that it does not hold a worker",
        extra={"watchdog_seconds": allowed},
    )
