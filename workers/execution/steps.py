"""What the two steps of an audit share: the plan/finalise step (workers.execution.audit_job)
and the shard step (workers.execution.shard_job).

The messages they send (Sends, send_safely), the problems they fail an audit with (storage
full, the runner's error, model not ready, time limit), the time limit itself, the sandbox and
device a runner gets, how an audit in its shard phase ends (end_unleased_audit, which
wakes the tenant's waiting audits), and the one loop that follows a runner child
(follow_child: its events, the heartbeat, stopping it). Neither step imports the other.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schemas import problem as problems
from schemas.audits import AuditRequest
from schemas.runner import RunnerEvent
from service.db.lifecycle import end_shard_phase
from service.db.stored_request import StoredRequestInvalid, stored_callback_url, stored_request
from service.db.tables import Audit, utcnow
from service.queue.dispatch import get_dispatcher
from service.settings import Settings
from service.storage.objects import StorageError, StorageFull, StorageRefused
from workers.execution.shard_leases import PRIORITY_RANK
from workers.sandbox.bubblewrap import Sandbox, has_gpu
from workers.sandbox.child import RunnerChild

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sends:
    """The messages the execution sends (tests record them instead): audit(audit_id, queue,
    priority), shards(audit_id, queue, priority, count), callback(audit_id)."""

    audit: Callable[..., object] = field(default_factory=lambda: get_dispatcher().audit)
    # (audit_id, queue, priority, count)
    shards: Callable[..., object] = field(default_factory=lambda: get_dispatcher().shards)
    callback: Callable[[str], object] = field(default_factory=lambda: get_dispatcher().callback)


def send_safely(send: Callable[..., object], *args: Any) -> None:
    """A broker outage never costs the work: the reconciler re-sends audit and shard messages
    from the rows later; a callback that cannot be enqueued is only that callback lost."""
    try:
        send(*args)
    except Exception:
        log.warning("could not send %s%r", getattr(send, "__name__", ""), args, exc_info=True)


def storage_full_problem(detail: str) -> dict[str, Any]:
    """The data directory (job directories, artifacts) ran out of space: the service's fault,
    not the audit's; the audit can be submitted again once an operator made room."""
    return problems.STORAGE_FULL.document(
        f"the service's data directory is full ({detail}); nothing of this audit's report was "
        "published; submit it again later"
    )


def storage_problem(exc: StorageError) -> dict[str, Any]:
    """The problem an audit fails with when the object store fails it for good: full
    (`storage-full`, as a full data directory), refusing the workers (`storage-unavailable`:
    credentials, a missing bucket), or holding a corrupted object (`internal-error`). An
    unreachable store (StorageUnavailable) fails nothing: the step waits for it instead."""
    if isinstance(exc, StorageFull):
        return problems.STORAGE_FULL.document(
            f"the service's object store is full ({exc}); nothing of this audit's report was "
            "published; submit it again later"
        )
    if isinstance(exc, StorageRefused):
        return problems.STORAGE_UNAVAILABLE.document(
            f"the service's object store refused the worker: {exc}"
        )
    return problems.INTERNAL_ERROR.document(f"the service's object store failed: {exc}")


def runner_error_problem(
    settings: Settings, event: RunnerEvent, *, what: str = "the audit", where: str = ""
) -> dict[str, Any]:
    """The problem an `error` event of the runner fails an audit with: storage full, memory
    limit, the model's or the input's fault (422) or the engine's (500). `what` names what ran
    (in the memory detail), `where` prefixes the detail (a shard names itself). The title is
    the problem type's, not the event's `message`."""
    info = event.info or {}
    if info.get("cause") == "storage":
        return storage_full_problem(event.reason or "no space left on device")
    if info.get("cause") == "model":
        return problems.MODEL_FAILED.document(
            where
            + "the audited model failed its probe through this audit's operator: "
            + (event.reason or "no reason given")
        )
    if info.get("cause") == "endpoint":
        return problems.ENDPOINT_UNAVAILABLE.document(
            where
            + "the model's endpoint could not answer the audit's queries: "
            + (event.reason or "no reason given")
        )
    if info.get("cause") == "query-budget":
        return problems.QUERY_BUDGET_EXHAUSTED.document(
            where
            + "the audit spent its query budget before it had queried enough (raise "
            + "budget.queries, or audit fewer images, levels or restarts): "
            + (event.reason or "no reason given")
        )
    if info.get("cause") == "memory":
        return problems.MEMORY_LIMIT.document(
            f"{what} exceeded the memory limit of {settings.runner_memory_bytes} "
            "bytes: audit fewer or smaller images, or fewer restarts"
        )
    kind = problems.INVALID_AUDIT_INPUT if info.get("status") == 422 else problems.INTERNAL_ERROR
    return kind.document(where + (event.reason or "the runner failed without a reason"))


def model_not_ready_detail(model_id: str) -> str:
    """The detail of `model-not-ready` when a worker takes an audit of a model that was deleted
    or is no longer `ready` (the audit and its shards say the same)."""
    return f"model {model_id} is not ready"


def is_storage_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def sandbox_for(settings: Settings, model_format: str) -> Sandbox:
    return Sandbox(
        mode=settings.sandbox,
        hidden_dirs=(settings.data_dir,),
        memory_bytes=settings.runner_memory_bytes,
        runs_uploaded_code=model_format != "safetensors",
        threads=settings.runner_threads,
        bwrap=settings.bwrap,
    )


@dataclass(frozen=True)
class TimeLimit:
    """An audit's wall-clock limit and where it comes from: `budget` (the audit's own
    budget.wall_seconds), `default` (derived from the model's probe time, or the service's soft
    limit) or `probe` (the plan step's budget to load and probe the model)."""

    seconds: float
    source: Literal["budget", "default", "probe"]
    explanation: str


def audit_time_limit_of(
    settings: Settings, request: AuditRequest | None, probe_seconds: float | None = None
) -> TimeLimit:
    """The wall-clock limit of the audit: the soft limit; tighter, what the measured probe time
    says the audit needs (probe_seconds × audit_probe_multiple, at least audit_min_time_limit);
    tighter still, the audit's own budget."""
    soft = float(settings.audit_soft_time_limit)
    limit = TimeLimit(
        soft,
        "default",
        f"the default of an audit without budget.wall_seconds: the service's "
        f"TIGHTROPE_AUDIT_SOFT_TIME_LIMIT ({soft:g} s; no probe time was measured)",
    )
    if probe_seconds is not None:
        derived = max(
            float(settings.audit_min_time_limit), probe_seconds * settings.audit_probe_multiple
        )
        limit = TimeLimit(
            min(soft, derived),
            "default",
            f"the default of an audit without budget.wall_seconds, derived from the model's "
            f"probe time: {probe_seconds:.4g} s × TIGHTROPE_AUDIT_PROBE_MULTIPLE "
            f"({settings.audit_probe_multiple:g}), at least TIGHTROPE_AUDIT_MIN_TIME_LIMIT "
            f"({settings.audit_min_time_limit} s), at most TIGHTROPE_AUDIT_SOFT_TIME_LIMIT "
            f"({soft:g} s)",
        )
    wall = None if request is None else request.budget.wall_seconds
    if wall and float(wall) <= limit.seconds:
        return TimeLimit(float(wall), "budget", "set by the audit's budget.wall_seconds")
    return limit


def audit_time_limit(
    settings: Settings, request: AuditRequest | None, probe_seconds: float | None = None
) -> float:
    """audit_time_limit_of's seconds."""
    return audit_time_limit_of(settings, request, probe_seconds).seconds


def time_limit_problem(
    session: Session,
    settings: Settings,
    audit_id: str,
    *,
    ran_seconds: float | None,
    shard: str | None = None,
) -> dict[str, Any]:
    """The `time-limit` problem of an audit that ran past its limit: what ran out of time (the
    audit, or one of its shards) after how long, and the limit that bound it: its value and
    its source (`extra`: limit_seconds, limit_source, shard), with what to change."""
    row = session.execute(
        select(Audit.request, Audit.probe_seconds).where(Audit.id == audit_id)
    ).one_or_none()
    request: AuditRequest | None = None
    if row is not None:
        try:
            request = stored_request(row.request, audit_id=audit_id)
        except StoredRequestInvalid:
            request = None  # the limit of an audit without a budget
    limit = audit_time_limit_of(settings, request, row.probe_seconds if row else None)
    what = f"shard {shard}" if shard else "the audit"
    if ran_seconds is None:
        ran = f"{what} could not start: the audit had used up its time limit"
    elif shard and ran_seconds < limit.seconds:
        ran = (
            f"{what} timed out after {round(ran_seconds, 1):g} s, what was left of the audit's "
            "time limit"
        )
    else:
        ran = f"{what} timed out after {round(ran_seconds, 1):g} s"
    remedy = (
        "raise budget.wall_seconds, or audit fewer or smaller images, fewer levels or restarts"
        if limit.source == "budget"
        else "set budget.wall_seconds to choose the limit, or audit fewer or smaller images, "
        "fewer levels or restarts"
    )
    return problems.TIME_LIMIT.document(
        f"{ran}; the audit's time limit is {limit.seconds:g} s, {limit.explanation}: {remedy}",
        extra={
            "limit_seconds": limit.seconds,
            "limit_source": limit.source,
            **({"shard": shard} if shard else {}),
        },
    )


def wants_gpu(request: AuditRequest) -> bool:
    device = request.device
    return device == "cuda" or (device == "auto" and has_gpu())


def running_audits(session: Session, tenant_id: str) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Audit)
            .where(Audit.tenant_id == tenant_id, Audit.status == "running")
        )
        or 0
    )


def wake_waiting_audits(session: Session, settings: Settings, tenant_id: str, sends: Sends) -> None:
    """A tenant's audit finished: start as many of its waiting audits as its share allows
    (highest priority, then oldest). The reconciler is the fallback if this message is lost."""
    if not tenant_id:
        return
    free = settings.tenant_max_running_audits - running_audits(session, tenant_id)
    if free <= 0:
        return
    waiting = session.execute(
        select(Audit.id, Audit.queue, Audit.priority, Audit.created_at).where(
            Audit.tenant_id == tenant_id, Audit.status == "queued", Audit.lease_owner.is_(None)
        )
    ).all()
    order = sorted(
        waiting, key=lambda row: (PRIORITY_RANK.get(row.priority, 1), row.created_at, row.id)
    )
    for row in order[:free]:
        send_safely(sends.audit, row.id, row.queue, row.priority)


def end_unleased_audit(
    session: Session,
    settings: Settings,
    audit_id: str,
    sends: Sends,
    *,
    status: str,
    error: dict[str, Any] | None = None,
) -> bool:
    """End an audit in its shard phase (no task holds its lease): failed by a shard, or
    cancelled (service.db.lifecycle.end_shard_phase, committed here), then its callback and
    its tenant's waiting audits. Conditional, so the first ending wins; its waiting shards are
    cancelled."""
    ended = end_shard_phase(session, audit_id, status=status, error=error, now=utcnow())
    session.commit()
    if not ended:
        return False
    row = session.execute(select(Audit.tenant_id, Audit.request).where(Audit.id == audit_id)).one()
    if stored_callback_url(row.request, audit_id=audit_id):
        send_safely(sends.callback, audit_id)
    wake_waiting_audits(session, settings, row.tenant_id, sends)
    return True


AfterBeat = Literal["go on", "stop", "wind down"]


class FollowedStep(Protocol):
    """What a step does with its runner child while follow_child follows it."""

    def on_event(self, event: RunnerEvent | None) -> bool:
        """Handle one event (None: a tick of silence); True when the step is done with the
        child (its result stored, its work failed, its lease lost): following ends at once."""
        ...

    def beat_due(self) -> bool:
        """Whether the step still holds a lease to renew (a shard's ends with its result)."""
        ...

    def beat(self, child: RunnerChild) -> AfterBeat:
        """Renew the lease and look for a cancel (killing the child where the step must stop
        it now). "stop": following ends now; "wind down": the child was asked to stop and is
        killed after the grace; "go on"."""
        ...


def follow_child(
    child: RunnerChild,
    step: FollowedStep,
    *,
    heartbeat_seconds: float,
    stop_grace_seconds: float = 0.0,
) -> None:
    """Follow the child's events until it ends or the step is done with it. The loop wakes at
    least every heartbeat_seconds (at most every second) even while the child is silent, so
    the lease is renewed, and a cancel or a lost lease noticed, on time; a child asked to stop
    ("wind down") is killed once stop_grace_seconds have passed. The child's time limit and
    its watchdog end the iteration themselves (RunnerChild.events); the caller reads how the
    child ended from child.finish()."""
    last_beat = time.monotonic()
    stop_asked_at: float | None = None
    for event in child.events(tick_seconds=min(heartbeat_seconds, 1.0)):
        if step.on_event(event):
            return
        now = time.monotonic()
        if step.beat_due() and now - last_beat >= heartbeat_seconds:
            after = step.beat(child)
            last_beat = now
            if after == "stop":
                return
            if after == "wind down" and stop_asked_at is None:
                stop_asked_at = now
        if stop_asked_at is not None and now - stop_asked_at >= stop_grace_seconds:
            child.kill()
            return
