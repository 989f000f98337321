"""One attempt at an audit: lease, job directory, sandboxed runner, results into the database.

The task process never imports torch: all the numerical work happens in the runner child,
whose JSON-line events this module turns into row updates. The lease is renewed on every
heartbeat (the event loop wakes up at least every heartbeat_seconds, even while the child is
silent), and cancellation and a lost lease are noticed at the same moments.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schemas import problem as problems
from schemas.audits import TERMINAL_STATES
from schemas.problem import ProblemType
from schemas.runner import RunnerEvent
from schemas.wording import count_of
from service.db.lifecycle import (
    LeaseOutcome,
    acquire_lease,
    cancel_waiting_shards,
    count_progress,
    end_shard_phase,
    gave_up_problem,
    hold_for_fair_share,
    monotone_progress,
    record_probe_seconds,
    release_lease,
    renew_lease,
    stage_planned_shards,
    store_shard_result,
    update_owned,
)
from service.db.models import Audit, Model, utcnow
from service.queue import broker as queue
from service.queue.dispatch import get_dispatcher
from service.settings import Settings
from service.storage.stores import ArtifactStore
from workers.execution import jobs
from workers.execution.heartbeat import set_current_work
from workers.execution.leases import new_owner
from workers.execution.shard_leases import PRIORITY_RANK
from workers.execution.warm_runner import start_runner
from workers.reporting.finalise import finalise_report
from workers.sandbox.bubblewrap import Sandbox, SandboxUnavailable, has_gpu
from workers.sandbox.child import RunnerChild

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 0.5  # at most ~2 progress writes per second


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
    settings: Settings, request: dict[str, Any], probe_seconds: float | None = None
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
    wall = (request.get("budget") or {}).get("wall_seconds")
    if wall and float(wall) <= limit.seconds:
        return TimeLimit(float(wall), "budget", "set by the audit's budget.wall_seconds")
    return limit


def audit_time_limit(
    settings: Settings, request: dict[str, Any], probe_seconds: float | None = None
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
    request, probe_seconds = (row.request or {}, row.probe_seconds) if row else ({}, None)
    limit = audit_time_limit_of(settings, request, probe_seconds)
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


def wants_gpu(request: dict[str, Any]) -> bool:
    device = request.get("device", "auto")
    return device == "cuda" or (device == "auto" and has_gpu())


@dataclass
class _Attempt:
    audit_id: str
    owner: str
    settings: Settings
    session: Session
    job_dir: Path
    sends: Sends
    tenant_id: str = ""
    route: tuple[str, str] = (queue.QUEUE_CPU, queue.DEFAULT_PRIORITY)  # (queue, priority)
    callback_url: str | None = None
    finished: bool = False  # a terminal status was written (or the lease was lost)
    lease_lost: bool = False
    cancelled: bool = False
    planned: bool = False
    probe_bound: bool = False  # its time limit is the probe's budget, not the audit's
    # where the step's time went (seconds by phase), for its log line
    timings: dict[str, float] = field(default_factory=dict)

    def fail(self, kind: ProblemType, detail: str) -> None:
        self.finish(status="failed", error=kind.document(detail))

    def finish(self, **values: Any) -> None:
        values.setdefault("finished_at", utcnow())
        if not release_lease(self.session, self.audit_id, self.owner, **values):
            self.lease_lost = True
        elif values.get("status") in TERMINAL_STATES:
            cancel_waiting_shards(self.session, self.audit_id)
            if self.callback_url:
                send_safely(self.sends.callback, self.audit_id)
            wake_waiting_audits(self.session, self.settings, self.tenant_id, self.sends)
        self.finished = True

    def heartbeat(self, child: RunnerChild) -> None:
        """Renew the lease; kill the child when the lease is lost or a cancel was asked."""
        if not renew_lease(
            self.session,
            self.audit_id,
            self.owner,
            now=utcnow(),
            lease_seconds=self.settings.lease_seconds,
        ):
            log.warning("audit %s: lease lost, stopping without writing", self.audit_id)
            self.lease_lost = self.finished = True
            child.kill()
            return
        if self.session.scalar(select(Audit.cancel_requested).where(Audit.id == self.audit_id)):
            self.cancelled = True
            child.kill()

    def record_progress(self, event: RunnerEvent) -> None:
        """Store the runner's progress, never lowering the audit's: the finalising runner
        starts again from 0.0 ("preparing operator and images") after every shard is done."""
        values = monotone_progress(
            min(max(event.fraction or 0.0, 0.0), 1.0),
            check=None if event.check is None else event.check[:64],
            message=None if event.message is None else event.message[:2000],
        )
        update_owned(self.session, self.audit_id, self.owner, **values)

    def record_shard(self, event: RunnerEvent) -> None:
        result = jobs.read_shard(self.job_dir, event.shard_id or "")
        if result is None:
            log.warning("audit %s: unreadable shard %r", self.audit_id, event.shard_id)
            return
        store_shard_result(self.session, self.audit_id, event.shard_id or "", result)

    def record_probe(self, event: RunnerEvent) -> None:
        """Keep the probe time the plan step measured: the audit's default limit derives from it."""
        probe = (event.info or {}).get("probe") or {}
        seconds = probe.get("probe_seconds")
        if isinstance(seconds, int | float) and seconds >= 0:
            record_probe_seconds(self.session, self.audit_id, float(seconds))

    def record_plan(self) -> None:
        """Store the planned shards as rows (keeping any stored before), release the audit
        (still `running`) and send one token per waiting shard, or the finalising task when
        every shard is already stored (an audit resumed after an upgrade)."""
        plan = jobs.read_plan(self.job_dir)
        if plan is None or not plan.shards:
            self.fail(problems.INTERNAL_ERROR, "the runner's shard plan is unreadable")
            return
        waiting = stage_planned_shards(
            self.session, self.audit_id, plan.shards, self.route[0], utcnow()
        )
        total = len(plan.shards)
        # Rows and the release stand or fall together: a task that lost the audit adds none.
        released = release_lease(
            self.session,
            self.audit_id,
            self.owner,
            shards_total=total,
            shards_done=total - waiting,
            # From here on, `attempts` counts the finalising task's tries (each step has
            # max_attempts); the planning tries are kept, so the API's `attempts` (the most
            # any step needed) never drops back to 0 (to_status).
            plan_attempts=Audit.attempts,
            attempts=0,
            progress_check=None,
            **monotone_progress(
                (total - waiting) / total, message=f"{count_of(total, 'shard')} planned"
            ),
        )
        self.finished = True
        if not released:
            self.lease_lost = True
            return
        self.planned = True
        if waiting:
            send_safely(self.sends.shards, self.audit_id, *self.route, waiting)
        else:
            send_safely(self.sends.audit, self.audit_id, *self.route)

    def record_report(self) -> None:
        report_file = self.job_dir / "out" / "report.json"
        try:
            report = json.loads(report_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.fail(problems.INTERNAL_ERROR, f"the runner's report is unreadable: {exc}")
            return
        verdict = report.get("verdict") if isinstance(report, dict) else None
        try:
            started = time.monotonic()
            if isinstance(report, dict):
                finalise_report(report, self.job_dir / "out", self.settings)
            self.timings["sign and render"] = time.monotonic() - started
            started = time.monotonic()
            jobs.import_outputs(self.session, self.settings, self.audit_id, self.job_dir)
            self.timings["import"] = time.monotonic() - started
        except OSError as exc:
            if not is_storage_full(exc):
                raise
            # No Artifact row was committed: nothing half-written is ever served.
            self.session.rollback()
            ArtifactStore(self.settings.artifact_dir).remove_audit(self.audit_id)
            self.finish(status="failed", error=storage_full_problem(str(exc)))
            return
        self.finish(
            status="succeeded",
            verdict=verdict if verdict in ("pass", "fail", "info", "error") else "error",
            report_path=f"{self.audit_id}/report.json",
            progress_fraction=1.0,
            error=None,
        )

    def record_error(self, event: RunnerEvent) -> None:
        self.finish(status="failed", error=runner_error_problem(self.settings, event))

    def handle(self, event: RunnerEvent) -> None:
        if event.event == "progress":
            self.record_progress(event)
        elif event.event == "shard":
            self.record_shard(event)
        elif event.event == "report":
            self.record_report()
        elif event.event == "plan":
            self.record_probe(event)
            self.record_plan()
        elif event.event == "error":
            self.record_error(event)

    def retry_or_give_up(self, returncode: int | None, stderr_tail: str, attempts: int) -> None:
        """The child died without a verdict (killed, out of memory): retry while attempts last."""
        if attempts < self.settings.max_attempts:
            if release_lease(
                self.session, self.audit_id, self.owner, status="queued", enqueued_at=utcnow()
            ):
                send_safely(self.sends.audit, self.audit_id, *self.route)
            self.finished = True
            return
        problem_dict = gave_up_problem(attempts)
        problem_dict["detail"] += f"; the last runner exited with code {returncode}"
        if stderr_tail:
            problem_dict["detail"] += ": " + stderr_tail.splitlines()[-1][:500]
        self.finish(status="failed", error=problem_dict)


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
    if (row.request or {}).get("callback_url"):
        send_safely(sends.callback, audit_id)
    wake_waiting_audits(session, settings, row.tenant_id, sends)
    return True


def execute_audit(
    audit_id: str,
    *,
    settings: Settings,
    session: Session,
    owner: str | None = None,
    sends: Sends | None = None,
) -> str:
    """Advance an audit by one step: plan its shards (the first time), finalise it (once every
    shard is stored), or nothing when shards are still running elsewhere. Returns what
    happened: a status, "planned", "waiting" (its tenant runs its share of audits already),
    "sharded" (shards still to run), or "busy"/"gave_up"/"lease_lost"."""
    sends = sends or Sends()
    owner = owner or new_owner()
    audit = session.get(Audit, audit_id, populate_existing=True)
    if audit is None:
        return "busy"
    if audit.status == "queued" and (
        running_audits(session, audit.tenant_id) >= settings.tenant_max_running_audits
    ):
        # Fair share: it waits. Marking it as freshly sent keeps the reconciler from re-sending
        # it at once; the tenant's next finishing audit wakes it (wake_waiting_audits).
        hold_for_fair_share(session, audit_id, utcnow())
        return "waiting"
    outcome = acquire_lease(
        session,
        audit_id,
        owner,
        now=utcnow(),
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
    )
    if outcome is LeaseOutcome.GAVE_UP:
        cancel_waiting_shards(session, audit_id)
        if _callback_url(session, audit_id):
            send_safely(sends.callback, audit_id)
    if outcome is not LeaseOutcome.ACQUIRED:
        return outcome.value
    audit = session.get(Audit, audit_id, populate_existing=True)
    assert audit is not None
    attempt = _Attempt(audit_id, owner, settings, session, Path(), sends)
    attempt.tenant_id = audit.tenant_id
    attempt.route = (audit.queue, audit.priority)
    attempt.callback_url = (audit.request or {}).get("callback_url")
    if audit.cancel_requested:
        attempt.finish(status="cancelled")
        return "cancelled"
    model = session.get(Model, audit.model_id)
    if model is None or model.status != "ready" or model.deleted_at is not None:
        attempt.fail(problems.MODEL_NOT_READY, model_not_ready_detail(audit.model_id))
        return "failed"
    kind: Literal["plan", "audit"] = "plan"
    if audit.shards_total > 0:
        done, total = count_progress(session, audit_id, utcnow())
        if done < total:
            # Shards are still running or waiting elsewhere (a duplicate message): hand back.
            release_lease(session, audit_id, owner, attempts=max(audit.attempts - 1, 0))
            return "sharded"
        kind = "audit"  # every shard is stored: merge, sign, render
        # Progress stays where the shards left it (1.0): the finalising runner's own count,
        # which starts again from 0.0, never lowers it (monotone_progress); say what runs now.
        update_owned(
            session,
            audit_id,
            owner,
            progress_check=None,
            progress_message=f"merging {count_of(total, 'shard')} into the report",
        )
    set_current_work(audit_id)
    step_started = time.monotonic()
    try:
        attempt.job_dir = jobs.materialise_audit_job(session, settings, audit, model, kind=kind)
        attempt.timings["job"] = time.monotonic() - step_started
    except jobs.JobInputError as exc:
        set_current_work(None)
        attempt.fail(problems.INVALID_AUDIT_INPUT, str(exc))
        return "failed"
    except OSError as exc:
        set_current_work(None)
        if not is_storage_full(exc):
            raise
        attempt.finish(status="failed", error=storage_full_problem(str(exc)))
        return "failed"
    try:
        limit = audit_time_limit(settings, audit.request, audit.probe_seconds)
        if kind == "plan" and settings.admission_time_limit < limit:
            # The plan step loads the model and probes it first: the probe's short budget.
            limit = float(settings.admission_time_limit)
            attempt.probe_bound = True
        result = _supervise_child(attempt, audit.request, audit.attempts, model.format, limit)
        return "planned" if attempt.planned else result
    finally:
        set_current_work(None)
        jobs.remove_job_dir(attempt.job_dir)
        phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in attempt.timings.items())
        log.info(
            "audit %s: %s step in %.2f s (%s)",
            audit_id,
            kind,
            time.monotonic() - step_started,
            phases,
        )


def _callback_url(session: Session, audit_id: str) -> str | None:
    request = session.scalar(select(Audit.request).where(Audit.id == audit_id))
    return (request or {}).get("callback_url")


def _supervise_child(
    attempt: _Attempt, request: dict[str, Any], attempts: int, model_format: str, limit: float
) -> str:
    settings = attempt.settings
    try:
        child = start_runner(
            settings,
            sandbox_for(settings, model_format),
            attempt.job_dir,
            time_limit=limit,
            use_gpu=wants_gpu(request),
        )
        attempt.job_dir = child.job_dir  # a warm runner's own directory holds the job now
    except SandboxUnavailable as exc:
        # The worker's fault, not the audit's: tried again (on any worker) while attempts last.
        log.error("audit %s: sandbox unavailable: %s", attempt.audit_id, exc)
        attempt.retry_or_give_up(None, f"the sandbox is unavailable: {exc}", attempts)
        return _final_status(attempt)
    last_beat = last_progress = child_started = time.monotonic()
    first_event = True
    pending_progress: RunnerEvent | None = None
    try:
        for event in child.events(tick_seconds=min(settings.heartbeat_seconds, 1.0)):
            now = time.monotonic()
            if event is not None and first_event:
                attempt.timings["runner's first event"] = now - child_started
                first_event = False
            if event is not None and event.event in ("plan", "report"):
                attempt.timings["runner"] = now - child_started
            if event is not None and event.event == "progress":
                pending_progress = event  # the newest wins; older ones are dropped
            elif event is not None:
                attempt.handle(event)
            if pending_progress is not None and now - last_progress >= PROGRESS_INTERVAL_SECONDS:
                attempt.record_progress(pending_progress)
                pending_progress, last_progress = None, now
            if attempt.finished:
                break
            if now - last_beat >= settings.heartbeat_seconds:
                attempt.heartbeat(child)
                last_beat = now
                if attempt.lease_lost or attempt.cancelled:
                    break
    except SoftTimeLimitExceeded:
        child.kill()
        child.finish()
        attempt.finish(status="failed", error=_timeout_problem(attempt, limit))
        return "failed"
    if attempt.finished:
        # Its result is stored: the child has nothing left to do, and an interpreter with
        # torch loaded takes seconds to exit on its own.
        child.kill()
    outcome = child.finish()
    if attempt.lease_lost:
        return "lease_lost"
    if attempt.finished:
        return _final_status(attempt)
    if attempt.cancelled:
        attempt.finish(status="cancelled")
        return "cancelled"
    if outcome.timed_out:
        attempt.finish(status="failed", error=_timeout_problem(attempt, limit))
        return "failed"
    attempt.retry_or_give_up(outcome.returncode, outcome.stderr_tail, attempts)
    return _final_status(attempt)


def _timeout_problem(attempt: _Attempt, limit: float) -> dict[str, Any]:
    if attempt.probe_bound:
        return problems.TIME_LIMIT.document(
            f"the model did not finish loading and its probe (one forward and input gradient "
            f"on 2 inputs) within {limit:g} s: it may never return; see the model's "
            "admission_info; the limit is the plan step's budget to load and probe the model "
            "(TIGHTROPE_ADMISSION_TIME_LIMIT)",
            extra={"limit_seconds": limit, "limit_source": "probe"},
        )
    return time_limit_problem(
        attempt.session, attempt.settings, attempt.audit_id, ran_seconds=limit
    )


def _final_status(attempt: _Attempt) -> str:
    if attempt.lease_lost:
        return "lease_lost"
    status = attempt.session.scalar(select(Audit.status).where(Audit.id == attempt.audit_id))
    attempt.session.commit()
    return status or "missing"
