"""One attempt at an audit: lease, job directory, sandboxed runner, results into the database.

The task process never imports torch: all the numerical work happens in the runner child,
whose JSON-line events this module turns into row updates. The lease is renewed on every
heartbeat (the event loop wakes up at least every heartbeat_seconds, even while the child is
silent), and cancellation and a lost lease are noticed at the same moments (the loop, which
the shard step shares: workers.execution.steps.follow_child).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas import problem as problems
from schemas.audits import TERMINAL_STATES, AuditRequest
from schemas.problem import ProblemType
from schemas.runner import RunnerEvent
from schemas.wording import count_of
from service.db.lifecycle import (
    LeaseOutcome,
    acquire_lease,
    cancel_waiting_shards,
    count_progress,
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
from service.db.stored_request import StoredRequestInvalid, stored_callback_url, stored_request
from service.db.tables import Audit, Model, utcnow
from service.queue import broker as queue
from service.settings import Settings
from service.storage.objects import StorageError, StorageUnavailable
from service.storage.stores import artifact_store
from workers.execution import job_dirs
from workers.execution.finalise import finalise_report
from workers.execution.heartbeat import set_current_work
from workers.execution.leases import new_owner
from workers.execution.query_relay import QueryRelay, endpoint_location, relay_for, report_queries
from workers.execution.steps import (
    AfterBeat,
    Sends,
    audit_time_limit,
    follow_child,
    is_storage_full,
    model_not_ready_detail,
    runner_error_problem,
    running_audits,
    sandbox_for,
    send_safely,
    storage_full_problem,
    storage_problem,
    time_limit_problem,
    wake_waiting_audits,
    wants_gpu,
)
from workers.execution.warm_runner import replace_spare, start_runner
from workers.sandbox.bubblewrap import SandboxUnavailable
from workers.sandbox.child import RunnerChild

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 0.5  # at most ~2 progress writes per second
REPORT_WRITTEN = "report written"  # a finished audit's message, as the engine's last progress says


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
    relay: QueryRelay | None = None  # an endpoint model's: answers the runner's queries
    model: Model | None = None
    request: AuditRequest | None = None

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
        result = job_dirs.read_shard(self.job_dir, event.shard_id or "")
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
        plan = job_dirs.read_plan(self.job_dir)
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
            **({} if self.relay is None else {"plan_queries": self.relay.ledger.to_json()}),
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
        if isinstance(report, dict) and self.relay is not None:
            self.add_queries(report)
        try:
            started = time.monotonic()
            if isinstance(report, dict):
                finalise_report(report, self.job_dir / "out", self.settings)
            self.timings["sign and render"] = time.monotonic() - started
            started = time.monotonic()
            job_dirs.import_outputs(self.session, self.settings, self.audit_id, self.job_dir)
            self.timings["import"] = time.monotonic() - started
        except OSError as exc:
            if not is_storage_full(exc):
                raise
            # No Artifact row was committed: nothing half-written is ever served.
            self.session.rollback()
            artifact_store(self.settings).remove_audit(self.audit_id)
            self.finish(status="failed", error=storage_full_problem(str(exc)))
            return
        except StorageUnavailable as exc:
            # No Artifact row was committed and the audit is not `succeeded`: what reached
            # the store is served by nothing; the next attempt writes it again.
            self.session.rollback()
            self.wait_for_storage(exc)
            return
        except StorageError as exc:
            self.session.rollback()
            with contextlib.suppress(StorageError):
                artifact_store(self.settings).remove_audit(self.audit_id)
            self.finish(status="failed", error=storage_problem(exc))
            return
        self.finish(
            status="succeeded",
            verdict=verdict if verdict in ("pass", "fail", "info", "error") else "error",
            report_path=f"{self.audit_id}/report.json",
            progress_fraction=1.0,
            # said here, not left to the runner's last progress event, which the throttle
            # drops when the report follows it within PROGRESS_INTERVAL_SECONDS
            progress_check=None,
            progress_message=REPORT_WRITTEN,
            error=None,
        )

    def add_queries(self, report: dict[str, Any]) -> None:
        """An endpoint model's report: its query ledger and where the endpoint answers (before
        it is signed and rendered; the runner never saw either)."""
        assert self.relay is not None and self.model is not None and self.request is not None
        self.relay.settle()  # its queries are all answered: `drawn` is final
        audit = self.session.get(Audit, self.audit_id, populate_existing=True)
        assert audit is not None
        report["queries"] = report_queries(
            self.settings, self.session, audit, self.request, self.relay.ledger
        )
        if isinstance(report.get("model"), dict):
            report["model"]["endpoint"] = endpoint_location(self.model)

    def wait_for_storage(self, exc: StorageUnavailable) -> None:
        """The object store is unreachable: the step is given back (queued, its attempt not
        spent) and the reconciler sends it again after requeue_after_seconds."""
        log.warning("audit %s waits for the object store: %s", self.audit_id, exc)
        release_lease(
            self.session,
            self.audit_id,
            self.owner,
            status="queued",
            enqueued_at=utcnow(),
            attempts=Audit.attempts - 1,
        )
        self.finished = True

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
    request: AuditRequest | None = None
    unreadable = ""
    try:
        request = stored_request(audit.request, audit_id=audit_id)
    except StoredRequestInvalid as exc:
        unreadable = str(exc)
    if request is not None and request.callback_url is not None:
        attempt.callback_url = str(request.callback_url)
    if audit.cancel_requested:
        attempt.finish(status="cancelled")
        return "cancelled"
    model = session.get(Model, audit.model_id)
    if model is None or model.status != "ready" or model.deleted_at is not None:
        attempt.fail(problems.MODEL_NOT_READY, model_not_ready_detail(audit.model_id))
        return "failed"
    if request is None:
        # Stored by a version whose request the schema no longer accepts: it cannot run, and
        # would fail the same way on every retry.
        attempt.fail(problems.INVALID_AUDIT_INPUT, unreadable)
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
        attempt.job_dir = job_dirs.materialise_audit_job(session, settings, audit, model, kind=kind)
        attempt.timings["job"] = time.monotonic() - step_started
    except job_dirs.JobInputError as exc:
        set_current_work(None)
        attempt.fail(problems.INVALID_AUDIT_INPUT, str(exc))
        return "failed"
    except OSError as exc:
        set_current_work(None)
        if not is_storage_full(exc):
            raise
        attempt.finish(status="failed", error=storage_full_problem(str(exc)))
        return "failed"
    except StorageUnavailable as exc:
        set_current_work(None)
        attempt.wait_for_storage(exc)
        return "waiting"
    except StorageError as exc:
        set_current_work(None)
        attempt.finish(status="failed", error=storage_problem(exc))
        return "failed"
    attempt.model, attempt.request = model, request
    attempt.relay = relay_for(settings, session, audit, model, request)
    try:
        limit = audit_time_limit(settings, request, audit.probe_seconds)
        if kind == "plan" and settings.admission_time_limit < limit:
            # The plan step loads the model and probes it first: the probe's short budget.
            limit = float(settings.admission_time_limit)
            attempt.probe_bound = True
        # The finalising step replaces the spare it took once it is done: the next job that
        # needs one is another audit's, and a spare importing torch meanwhile would slow down
        # signing and rendering this report (docs/benchmarks.md, "Where a small audit's
        # time goes"). A plan step's shards need a spare at once.
        result = _supervise_child(
            attempt, request, audit.attempts, model.format, limit, replace_spare=kind == "plan"
        )
        return "planned" if attempt.planned else result
    finally:
        set_current_work(None)
        if attempt.relay is not None:
            attempt.relay.close()
        job_dirs.remove_job_dir(attempt.job_dir)
        phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in attempt.timings.items())
        log.info(
            "audit %s: %s step in %.2f s (%s)",
            audit_id,
            kind,
            time.monotonic() - step_started,
            phases,
        )
        if kind == "audit":
            try:
                replace_spare(settings)
            except OSError as exc:  # e.g. a full disk: the next job starts cold
                log.warning("no warm runner after audit %s: %s", audit_id, exc)


def _callback_url(session: Session, audit_id: str) -> str | None:
    stored = session.scalar(select(Audit.request).where(Audit.id == audit_id))
    return stored_callback_url(stored, audit_id=audit_id)


def _supervise_child(
    attempt: _Attempt,
    request: AuditRequest,
    attempts: int,
    model_format: str,
    limit: float,
    *,
    replace_spare: bool = True,
) -> str:
    settings = attempt.settings
    try:
        child = start_runner(
            settings,
            sandbox_for(settings, model_format),
            attempt.job_dir,
            time_limit=limit,
            use_gpu=wants_gpu(request),
            relay=attempt.relay,
            replace_spare=replace_spare,
        )
        attempt.job_dir = child.job_dir  # a warm runner's own directory holds the job now
    except SandboxUnavailable as exc:
        # The worker's fault, not the audit's: tried again (on any worker) while attempts last.
        log.error("audit %s: sandbox unavailable: %s", attempt.audit_id, exc)
        attempt.retry_or_give_up(None, f"the sandbox is unavailable: {exc}", attempts)
        return _final_status(attempt)
    try:
        follow_child(
            child, _AuditEvents(attempt, child), heartbeat_seconds=settings.heartbeat_seconds
        )
        child.wait_for_query()
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


@dataclass
class _AuditEvents:
    """The plan or finalise step's part of follow_child: each event into the audit's row
    (progress at most every PROGRESS_INTERVAL_SECONDS, the newest winning), its timings, and
    the audit's lease renewed on every beat. The runner's `plan` or `report` is its last word,
    its files written before it: the child is ended then, before the step stores its result,
    since an interpreter with torch loaded takes a core for seconds to exit, and signing and
    rendering the report would wait for it."""

    attempt: _Attempt
    child: RunnerChild | None = None
    started: float = field(default_factory=time.monotonic)
    first_event: bool = True
    pending_progress: RunnerEvent | None = None
    last_progress: float = 0.0

    def __post_init__(self) -> None:
        self.last_progress = self.started

    def on_event(self, event: RunnerEvent | None) -> bool:
        attempt, now = self.attempt, time.monotonic()
        if event is not None and self.first_event:
            attempt.timings["runner's first event"] = now - self.started
            self.first_event = False
        if event is not None and event.event in ("plan", "report"):
            attempt.timings["runner"] = now - self.started
            if self.child is not None:
                self.child.kill()
        if event is not None and event.event == "progress":
            self.pending_progress = event  # the newest wins; older ones are dropped
        elif event is not None:
            attempt.handle(event)
        if (
            self.pending_progress is not None
            and now - self.last_progress >= PROGRESS_INTERVAL_SECONDS
        ):
            attempt.record_progress(self.pending_progress)
            self.pending_progress, self.last_progress = None, now
        return attempt.finished

    def beat_due(self) -> bool:
        return True

    def beat(self, child: RunnerChild) -> AfterBeat:
        self.attempt.heartbeat(child)
        return "stop" if self.attempt.lease_lost or self.attempt.cancelled else "go on"


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
