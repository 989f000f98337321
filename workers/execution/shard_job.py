"""One shard of an audit, run by whichever worker took its token.

The worker leases the fairest waiting shard of its queue (workers.execution.shard_leases;
the lease and every status it writes: service.db.lifecycle),
runs it in a sandboxed child from a job directory it keeps for the audit
(workers.execution.job_dir_cache), and stores
the result the moment the child reports it. The worker that stores the last shard sends the
finalising task. A child that dies is retried (another token) until max_attempts; an error
the engine reports fails the whole audit, since every other shard would meet it too.
Cancellation: the child is asked to stop (STOP in its job directory, which the engine checks
between shards), then killed after STOP_GRACE_SECONDS. A child that stays silent longer than
its watchdog allows (one call of the model that does not return; workers.execution.watchdog)
is killed and fails the audit with `model-hung`, long before the audit's time limit.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schemas import problem as problems
from schemas.audits import AuditRequest
from schemas.runner import STOP_FILE, RunnerEvent
from service.db.lifecycle import count_progress, gave_up_problem, release_shard, renew_shard
from service.db.stored_request import StoredRequestInvalid, stored_request
from service.db.tables import Audit, AuditShard, Model, utcnow
from service.settings import Settings
from service.storage.objects import StorageError, StorageUnavailable
from workers.execution import job_dirs
from workers.execution.heartbeat import set_current_work
from workers.execution.job_dir_cache import JobDirCache, worker_cache
from workers.execution.leases import new_owner
from workers.execution.query_relay import QueryRelay, relay_for
from workers.execution.shard_leases import ClaimedShard, claim_shard
from workers.execution.steps import (
    AfterBeat,
    Sends,
    audit_time_limit,
    end_unleased_audit,
    follow_child,
    is_storage_full,
    model_not_ready_detail,
    runner_error_problem,
    sandbox_for,
    send_safely,
    storage_full_problem,
    storage_problem,
    time_limit_problem,
    wants_gpu,
)
from workers.execution.warm_runner import start_runner
from workers.execution.watchdog import Watchdog, hung_problem, probe_time, watchdog_for
from workers.sandbox.bubblewrap import SandboxUnavailable
from workers.sandbox.child import RunnerChild

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 2.0


@dataclass
class _ShardRun:
    claimed: ClaimedShard
    owner: str
    worker: str
    settings: Settings
    session: Session
    sends: Sends
    job_dir: Path
    route: tuple[str, str]
    stored: bool = False
    done: bool = False  # the child said it finished its shards
    stop: bool = False  # cancel or lost lease: the child is being stopped
    lease_lost: bool = False
    failed: bool = False  # the audit was failed by this shard's error
    relay: QueryRelay | None = None  # an endpoint model's: answers the runner's queries

    @property
    def audit_id(self) -> str:
        return self.claimed.audit_id

    def fail_audit(self, error: dict[str, Any]) -> None:
        self.failed = True
        release_shard(
            self.session, self.audit_id, self.claimed.shard_id, self.owner, status="cancelled"
        )
        end_unleased_audit(
            self.session, self.settings, self.audit_id, self.sends, status="failed", error=error
        )

    def store(self, event: RunnerEvent) -> None:
        if event.shard_id != self.claimed.shard_id:
            log.warning(
                "audit %s: the child reported shard %r, not %r",
                self.audit_id,
                event.shard_id,
                self.claimed.shard_id,
            )
            return
        result = job_dirs.read_shard(self.job_dir, event.shard_id)
        if result is None:
            log.warning("audit %s: unreadable shard %r", self.audit_id, event.shard_id)
            return
        if self.relay is not None:
            # the worker's count of this shard's queries goes with its result (never the
            # runner's word): a shard run again replaces it, so nothing is counted twice
            result = {**result, "queries": self.relay.ledger.to_json()}
        now = utcnow()
        if release_shard(
            self.session,
            self.audit_id,
            self.claimed.shard_id,
            self.owner,
            status="done",
            result=result,
            worker=self.worker[:200],
            finished_at=now,
        ):
            self.stored = True
        else:
            self.lease_lost = True

    def record_error(self, event: RunnerEvent) -> None:
        where = f"shard {self.claimed.shard_id}: "
        self.fail_audit(runner_error_problem(self.settings, event, what="a shard", where=where))

    def heartbeat(self, child: RunnerChild) -> None:
        if not renew_shard(
            self.session,
            self.audit_id,
            self.claimed.shard_id,
            self.owner,
            now=utcnow(),
            seconds=self.settings.lease_seconds,
        ):
            log.warning(
                "audit %s shard %s: lease lost; stopping", self.audit_id, self.claimed.shard_id
            )
            self.lease_lost = self.stop = True
            child.kill()
            return
        row = self.session.execute(
            select(Audit.status, Audit.cancel_requested).where(Audit.id == self.audit_id)
        ).one_or_none()
        if row is None or row.cancel_requested or row.status != "running":
            self.stop = True
            _ask_to_stop(self.job_dir)

    def finished_shard(self) -> None:
        done, total = count_progress(self.session, self.audit_id, utcnow())
        if total and done >= total:
            # Whichever worker stores the last shard sends the finalising task; a duplicate
            # (two last shards at once) is refused by the audit's lease.
            send_safely(self.sends.audit, self.audit_id, *self.route)
        else:
            _cancel_if_asked(self)  # a cancel that came while this shard was finishing


def _ask_to_stop(job_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (job_dir / STOP_FILE).touch()


def _remaining_seconds(
    settings: Settings, audit: Audit, request: AuditRequest, now: datetime
) -> float:
    """The child's wall-clock limit: the soft limit, or what is left of the audit's budget."""
    limit = audit_time_limit(settings, request, audit.probe_seconds)
    wall = request.budget.wall_seconds
    if wall and audit.started_at is not None:
        limit = min(limit, float(wall) - (now - audit.started_at).total_seconds())
    return limit


def execute_shard(
    hint: str,
    queue_name: str,
    *,
    settings: Settings,
    session: Session,
    worker: str = "worker",
    owner: str | None = None,
    sends: Sends | None = None,
    cache: JobDirCache | None = None,
) -> str:
    """Run the fairest waiting shard of `queue_name`; returns "idle" (none waiting), "done",
    "retry", "failed", "cancelled" or "lease_lost". `hint` (the audit whose plan sent this
    token) is only logged: the database decides which shard runs."""
    sends = sends or Sends()
    owner = owner or new_owner()
    cache = cache if cache is not None else worker_cache(settings)
    claimed = claim_shard(
        session, queue_name, owner, now=utcnow(), lease_seconds=settings.lease_seconds
    )
    if claimed is None:
        return "idle"
    log.info("shard %s of %s (token from %s)", claimed.shard_id, claimed.audit_id, hint)
    audit = session.get(Audit, claimed.audit_id, populate_existing=True)
    assert audit is not None
    run = _ShardRun(
        claimed, owner, worker, settings, session, sends, Path(), (audit.queue, audit.priority)
    )
    model = session.get(Model, audit.model_id)
    if model is None or model.status != "ready" or model.deleted_at is not None:
        run.fail_audit(problems.MODEL_NOT_READY.document(model_not_ready_detail(audit.model_id)))
        return "failed"
    try:
        request = stored_request(audit.request, audit_id=claimed.audit_id)
    except StoredRequestInvalid as exc:
        run.fail_audit(problems.INVALID_AUDIT_INPUT.document(str(exc)))
        return "failed"
    limit = _remaining_seconds(settings, audit, request, utcnow())
    if limit <= 0:
        run.fail_audit(
            time_limit_problem(
                session, settings, claimed.audit_id, ran_seconds=None, shard=claimed.shard_id
            )
        )
        return "failed"
    watchdog = watchdog_for(settings, probe_time(model.admission_info, audit.probe_seconds))
    set_current_work(claimed.audit_id)
    try:
        try:
            run.job_dir = cache.job_dir(session, settings, audit, model, owner.split(":")[1])
            job_dirs.write_shard_job(run.job_dir, [claimed.shard_id])
        except job_dirs.JobInputError as exc:
            run.fail_audit(problems.INVALID_AUDIT_INPUT.document(str(exc)))
            return "failed"
        except OSError as exc:
            if not is_storage_full(exc):
                raise
            run.fail_audit(storage_full_problem(str(exc)))
            return "failed"
        except StorageUnavailable as exc:
            return _wait_for_storage(run, exc)
        except StorageError as exc:
            run.fail_audit(storage_problem(exc))
            return "failed"
        run.relay = relay_for(settings, session, audit, model, request)
        return _supervise(run, request, limit, model.format, cache, watchdog)
    finally:
        set_current_work(None)
        if run.relay is not None:
            run.relay.close()
        if run.job_dir != Path():
            cache.release(run.job_dir)


def _supervise(
    run: _ShardRun,
    request: AuditRequest,
    limit: float,
    model_format: str,
    cache: JobDirCache,
    watchdog: Watchdog,
) -> str:
    settings = run.settings
    # A child kept from this audit's previous shard on this worker runs the next one: no new
    # process, no second import of torch, no second load of the model. A child kept for
    # another audit is ended first: one runner (one loaded model) per worker at a time.
    child = cache.kept_child(run.job_dir)
    if child is not None and not child.next_job(limit, watchdog.limit):
        cache.drop_child(run.job_dir)
        child = None
    if child is None:
        try:
            child = start_runner(
                settings,
                sandbox_for(settings, model_format),
                run.job_dir,
                time_limit=limit,
                use_gpu=wants_gpu(request),
                serve=True,
                stall_limit=watchdog.limit,
            )
            if child.job_dir != run.job_dir:  # a warm runner's own directory holds it now
                cache.moved(run.job_dir, child.job_dir)
                run.job_dir = child.job_dir
        except SandboxUnavailable as exc:
            # This worker cannot run shards; the model is not at fault: another worker may.
            log.error("sandbox unavailable: %s", exc)
            return _retry_or_give_up(run, f"the sandbox is unavailable on {run.worker}: {exc}")
    child.relay = run.relay  # this job's (a kept child served another shard's before)
    try:
        return _follow(run, child, limit, cache, watchdog)
    except BaseException:
        # The database or the broker went away mid-shard: never leave the child running.
        cache.drop_child(run.job_dir)
        child.kill()
        child.finish()
        raise


def _follow(
    run: _ShardRun, child: RunnerChild, limit: float, cache: JobDirCache, watchdog: Watchdog
) -> str:
    follow_child(
        child,
        _ShardEvents(run, child),
        heartbeat_seconds=run.settings.heartbeat_seconds,
        stop_grace_seconds=STOP_GRACE_SECONDS,
    )
    child.wait_for_query()
    if run.done and run.stored and not run.stop and child.alive():
        if _shards_waiting(run.session, run.audit_id):
            # idle, its model loaded, for this audit's next shard; ended after
            # runner_idle_seconds if none comes to this worker
            cache.keep_child(run.job_dir, child, idle_seconds=run.settings.runner_idle_seconds)
        else:  # nothing of this audit is left to run here: the runner ends with it
            cache.drop_child(run.job_dir)
            child.kill()
            child.finish()
        run.finished_shard()
        return "done"
    cache.drop_child(run.job_dir)
    child.kill()
    outcome = child.finish()
    if run.stored:
        run.finished_shard()
        return "done"
    if run.failed:
        return "failed"
    if run.lease_lost:
        return "lease_lost"
    if run.stop:
        release_shard(
            run.session, run.audit_id, run.claimed.shard_id, run.owner, status="cancelled"
        )
        _cancel_if_asked(run)
        return "cancelled"
    if outcome.stalled:
        allowed = outcome.stall_seconds or watchdog.limit.floor
        log.warning(
            "audit %s shard %s: the runner was silent for %g s (%s): killed",
            run.audit_id,
            run.claimed.shard_id,
            allowed,
            watchdog.basis(outcome.largest_batch),
        )
        run.fail_audit(hung_problem(watchdog, run.claimed.shard_id, allowed, outcome.largest_batch))
        return "failed"
    if outcome.timed_out:
        run.fail_audit(
            time_limit_problem(
                run.session,
                run.settings,
                run.audit_id,
                ran_seconds=limit,
                shard=run.claimed.shard_id,
            )
        )
        return "failed"
    detail = f"the last runner exited with code {outcome.returncode}"
    if outcome.stderr_tail:
        detail += ": " + outcome.stderr_tail.splitlines()[-1][:500]
    return _retry_or_give_up(run, detail)


@dataclass
class _ShardEvents:
    """The shard step's part of follow_child: the result stored the moment it comes, an error
    failing the audit, the shard's lease renewed until its result is stored, and a cancel or
    a lost lease winding the child down (STOP, then a kill after STOP_GRACE_SECONDS)."""

    run: _ShardRun
    child: RunnerChild

    def on_event(self, event: RunnerEvent | None) -> bool:
        run = self.run
        if event is not None:
            if event.event == "shard":
                run.store(event)
            elif event.event == "done":
                run.done = True
                return True  # the child waits for its next job
            elif event.event == "error" and not run.stop:
                run.record_error(event)
        if run.failed or run.lease_lost:
            self.child.kill()
            return True
        return False

    def beat_due(self) -> bool:
        # Once the result is stored the lease is released: nothing is left to renew.
        return not self.run.stored

    def beat(self, child: RunnerChild) -> AfterBeat:
        self.run.heartbeat(child)
        return "wind down" if self.run.stop else "go on"


def _shards_waiting(session: Session, audit_id: str) -> int:
    """How many of the audit's shards wait for a worker (a kept runner may serve one)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(AuditShard)
            .where(AuditShard.audit_id == audit_id, AuditShard.status == "queued")
        )
        or 0
    )


def _cancel_if_asked(run: _ShardRun) -> None:
    cancel = run.session.scalar(select(Audit.cancel_requested).where(Audit.id == run.audit_id))
    if cancel:
        end_unleased_audit(run.session, run.settings, run.audit_id, run.sends, status="cancelled")


def _wait_for_storage(run: _ShardRun, exc: StorageUnavailable) -> str:
    """The object store is unreachable (the model or a dataset could not be fetched): the
    shard waits, queued again without spending an attempt; the reconciler sends it a new
    token after requeue_after_seconds, so it runs once the store is back."""
    log.warning(
        "shard %s of %s waits for the object store: %s", run.claimed.shard_id, run.audit_id, exc
    )
    release_shard(
        run.session,
        run.audit_id,
        run.claimed.shard_id,
        run.owner,
        status="queued",
        attempts=AuditShard.attempts - 1,
        enqueued_at=utcnow(),
    )
    return "retry"


def _retry_or_give_up(run: _ShardRun, detail: str) -> str:
    """The child ended without a result: queue the shard again while attempts last."""
    if run.claimed.attempts < run.settings.max_attempts:
        if release_shard(
            run.session,
            run.audit_id,
            run.claimed.shard_id,
            run.owner,
            status="queued",
            enqueued_at=utcnow(),
        ):
            send_safely(run.sends.shards, run.audit_id, *run.route, 1)
        return "retry"
    error = gave_up_problem(run.claimed.attempts)
    error["detail"] += f" (shard {run.claimed.shard_id}); {detail}"
    run.fail_audit(error)
    return "failed"
