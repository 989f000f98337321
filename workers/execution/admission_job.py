"""Admit an uploaded model: load and probe it in the sandbox, with a time and a memory limit.

A model is a program: it may never return or may allocate without end, so every way the child
can end is turned into a verdict (`ready` or `rejected` with a reason a person can act on),
never left `validating`. The attempt count lives in `admission_info` while validating, so a model
that keeps killing its worker is rejected after settings.max_attempts.

A worker that cannot sandbox (workers.execution.sandbox_check) is not the model's fault: a model
that needs the sandbox stays `validating` with a reason that says so, for another worker, and
is rejected with that reason once it has waited settings.sandbox_wait_seconds since its upload.
"""

from __future__ import annotations

import logging
import signal
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from schemas.endpoints import ENDPOINT_FORMAT
from service.db.heartbeats import SANDBOXED_FORMATS, sandbox_count
from service.db.tables import Model, utcnow
from service.settings import Settings
from service.storage.objects import (
    ObjectCorrupt,
    ObjectMissing,
    StorageRefused,
    StorageUnavailable,
)
from workers.execution import job_dirs
from workers.execution.endpoint_admission import admit_endpoint
from workers.execution.heartbeat import set_current_work, worker_name
from workers.execution.sandbox_check import current_state, mark_unavailable, needs_sandbox
from workers.execution.steps import sandbox_for
from workers.execution.warm_runner import start_runner
from workers.sandbox.bubblewrap import SandboxUnavailable
from workers.sandbox.child import ChildOutcome, RunnerChild

log = logging.getLogger(__name__)


def _set_status(session: Session, model_id: str, **values: Any) -> bool:
    """Write the model's outcome unless another attempt already decided it."""
    changed = session.execute(
        update(Model)
        .where(Model.id == model_id, Model.status == "validating")
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return changed.rowcount == 1  # type: ignore[attr-defined]


def _memory_reason(settings: Settings) -> str:
    mib = settings.runner_memory_bytes // (1024 * 1024)
    return f"exceeded the memory limit of {mib} MiB while loading or probing the model"


def _reason_without_event(settings: Settings, outcome: ChildOutcome) -> str:
    if outcome.timed_out:
        return (
            f"timed out after {settings.admission_time_limit} s while loading or probing the model"
        )
    if outcome.returncode == -signal.SIGKILL:
        # Not killed by us: the kernel's out-of-memory killer is the usual cause.
        return _memory_reason(settings)
    return f"the model crashed the runner (exit code {outcome.returncode})"


def execute_admission(model_id: str, *, settings: Settings, session: Session) -> str:
    """Admit one model; returns its status afterwards ("skipped" if it was not validating)."""
    model = session.get(Model, model_id, populate_existing=True)
    if model is None or model.status != "validating" or model.deleted_at is not None:
        return "skipped"
    if model.format == ENDPOINT_FORMAT:  # no file, no code: probed from here, not the sandbox
        return admit_endpoint(model, settings=settings, session=session)
    attempts = int((model.admission_info or {}).get("attempts", 0))
    if attempts >= settings.max_attempts:
        _set_status(
            session,
            model_id,
            status="rejected",
            reason=f"gave up after {attempts} attempts: the admission never finished",
        )
        return "rejected"
    if needs_sandbox(settings, model.format):
        state = current_state(settings)
        if state is not None and not state.works:
            return _without_sandbox(session, settings, model, str(state.problem))
    _set_status(session, model_id, admission_info={"attempts": attempts + 1})
    set_current_work(model_id)
    try:
        job_dir = job_dirs.materialise_admission_job(settings, model, attempts + 1)
    except (StorageUnavailable, StorageRefused) as exc:
        # The model's file cannot be fetched for now (the store is down, or refuses this
        # worker's credentials: the worker's fault, not the model's): the attempt is given
        # back, and the reconciler sends the admission again (the model stays `validating`).
        set_current_work(None)
        _set_status(session, model_id, admission_info={"attempts": attempts})
        log.warning("cannot admit %s yet: %s", model_id, exc)
        return "waiting"
    except (ObjectCorrupt, ObjectMissing, job_dirs.JobInputError) as exc:
        # The stored upload itself is damaged or gone: no retry can admit it.
        set_current_work(None)
        reason = f"the uploaded file cannot be read back intact ({exc}); upload it again"
        _set_status(session, model_id, status="rejected", reason=reason)
        log.error("rejecting %s: %s", model_id, exc)
        return "rejected"
    unavailable: str | None = None
    try:
        values = _run_admission(settings, job_dir, model.format)
    except SandboxUnavailable as exc:
        # This worker's fault, not the model's: the attempt is given back.
        unavailable = str(exc)
        _set_status(session, model_id, admission_info={"attempts": attempts})
    finally:
        set_current_work(None)
        job_dirs.remove_job_dir(job_dir)
    if unavailable is not None:
        mark_unavailable(unavailable)
        return _without_sandbox(session, settings, model, unavailable)
    _set_status(session, model_id, **values)
    return str(values["status"])


def _without_sandbox(session: Session, settings: Settings, model: Model, problem: str) -> str:
    """This worker cannot sandbox the model: it stays `validating` with a reason (the
    reconciler sends it again, to this or another worker) until it has waited
    sandbox_wait_seconds since its upload; then it is rejected with the reason."""
    now = utcnow()
    others = sandbox_count(session, settings.worker_stale_seconds, now=now, exclude=worker_name())
    wait = settings.sandbox_wait_seconds
    deadline = model.created_at + timedelta(seconds=wait)
    log.warning(
        "cannot admit %s here: this worker cannot sandbox models (%s); %d other live worker(s) can",
        model.id,
        problem,
        others.able,
    )
    until = deadline.strftime("%Y-%m-%d %H:%M:%S UTC")
    if now >= deadline:
        if others.able:
            why = (
                f"no worker that can sandbox models took it within {wait:g} s (those that got "
                "it cannot: bubblewrap is missing or not working there; "
                f"{others.able} live worker(s) can)"
            )
        else:
            why = (
                "no worker can sandbox models: bubblewrap is missing or not working on every "
                f"live worker, and the model waited {wait:g} s for one"
            )
        reason = (
            f"{why}. {SANDBOXED_FORMATS} models run only in the sandbox: upload the model "
            "again once the operator has made bubblewrap work on the workers"
        )
        _set_status(session, model.id, status="rejected", reason=reason)
        return "rejected"
    if others.able:
        reason = (
            "waiting for a worker that can sandbox models: the one that got it cannot "
            f"(bubblewrap is missing or not working there), {others.able} live worker(s) can; "
            f"refused at {until} if none has admitted it by then"
        )
    else:
        reason = (
            "no worker can sandbox models: bubblewrap is missing or not working on every live "
            f"worker; the model waits for one until {until}, then is refused"
        )
    _set_status(session, model.id, reason=reason)
    return "sandbox-unavailable"


def _run_admission(settings: Settings, job_dir: Any, model_format: str) -> dict[str, Any]:
    child = start_runner(  # raises SandboxUnavailable: handled by the caller
        settings,
        sandbox_for(settings, model_format),
        job_dir,
        time_limit=settings.admission_time_limit,
        use_gpu=False,  # probing needs no GPU, and RLIMIT_AS holds only on the CPU
    )
    try:
        return _decide(settings, child)
    finally:
        if child.job_dir != job_dir:  # a warm runner's own directory holds the job now
            job_dirs.remove_job_dir(child.job_dir)


def _decide(settings: Settings, child: RunnerChild) -> dict[str, Any]:
    decision: dict[str, Any] | None = None
    for event in child.events(tick_seconds=1.0):
        if event is None:
            continue
        if event.event == "admitted":
            decision = {"status": "ready", "reason": None, "admission_info": event.info or {}}
        elif event.event == "rejected":
            decision = {"status": "rejected", "reason": event.reason or "rejected"}
        elif event.event == "error":
            info = event.info or {}
            reason = (
                _memory_reason(settings)
                if info.get("cause") == "memory"
                else f"the model could not be loaded or probed: {event.reason}"
            )
            decision = {"status": "rejected", "reason": reason}
        if decision is not None:
            break
    if decision is not None:
        child.kill()  # decided: nothing is left to wait for (an exit takes seconds with torch)
    outcome = child.finish()
    if decision is None:
        log.info("admission ended without a decision: %s", outcome.stderr_tail[-2000:])
        decision = {"status": "rejected", "reason": _reason_without_event(settings, outcome)}
    return decision
