"""Reading the workers' heartbeat rows: which workers are live, and which of them can sandbox
uploaded models (docs/security.md, "Without bubblewrap"). Read by /readyz and by admissions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import WorkerHeartbeat, utcnow

# What a `.pt`, `.pt2` or `.onnx` model needs: its code runs only in the sandbox.
SANDBOXED_FORMATS = "TorchScript .pt, torch.export .pt2 and ONNX .onnx"


@dataclass(frozen=True)
class SandboxCount:
    """The live workers (a heartbeat within the stale time) and how many cannot sandbox.

    A worker whose row predates the sandbox column (`sandbox` null) counts as able to; one
    with TIGHTROPE_SANDBOX=off too (it runs models unconfined), and is counted in `off`.
    """

    live: int = 0
    unavailable: int = 0
    off: int = 0
    problems: list[str] = field(default_factory=list)  # distinct, as the workers said them

    @property
    def able(self) -> int:
        return self.live - self.unavailable


def sandbox_count(
    session: Session,
    stale_seconds: float,
    *,
    now: datetime | None = None,
    exclude: str | None = None,
) -> SandboxCount:
    """Count the live workers by sandbox state; `exclude` leaves one (the asking worker) out."""
    cutoff = (now or utcnow()) - timedelta(seconds=stale_seconds)
    query = select(
        WorkerHeartbeat.name, WorkerHeartbeat.sandbox, WorkerHeartbeat.sandbox_problem
    ).where(WorkerHeartbeat.last_seen >= cutoff)
    if exclude is not None:
        query = query.where(WorkerHeartbeat.name != exclude)
    live = unavailable = off = 0
    problems: list[str] = []
    for _name, status, problem in session.execute(query).all():
        live += 1
        if status == "off":
            off += 1
        elif status == "unavailable":
            unavailable += 1
            if problem and problem not in problems:
                problems.append(problem)
    return SandboxCount(live=live, unavailable=unavailable, off=off, problems=problems)
