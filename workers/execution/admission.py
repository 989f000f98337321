"""Admit an uploaded model: load and probe it in the sandbox, with a time and a memory limit.

A model is a program: it may never return or may allocate without end, so every way the child
can end is turned into a verdict (`ready` or `rejected` with a reason a person can act on),
never left `validating`. The attempt count lives in `admission_info` while validating, so a model
that keeps killing its worker is rejected after settings.max_attempts.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.db.models import Model
from service.settings import Settings
from workers.execution import jobs
from workers.execution.audit_job import sandbox_for
from workers.execution.heartbeat import set_current_work
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
    attempts = int((model.admission_info or {}).get("attempts", 0))
    if attempts >= settings.max_attempts:
        _set_status(
            session,
            model_id,
            status="rejected",
            reason=f"gave up after {attempts} attempts: the admission never finished",
        )
        return "rejected"
    _set_status(session, model_id, admission_info={"attempts": attempts + 1})
    set_current_work(model_id)
    job_dir = jobs.materialise_admission_job(settings, model, attempts + 1)
    try:
        values = _run_admission(settings, job_dir, model.format)
    except SandboxUnavailable as exc:
        # This worker's fault, not the model's: it stays `validating` (the attempt is given
        # back) and the reconciler sends it again, to this or another worker, later.
        log.error("cannot admit %s here: %s", model_id, exc)
        _set_status(session, model_id, admission_info={"attempts": attempts})
        return "sandbox-unavailable"
    finally:
        set_current_work(None)
        jobs.remove_job_dir(job_dir)
    _set_status(session, model_id, **values)
    return str(values["status"])


def _run_admission(settings: Settings, job_dir: Any, model_format: str) -> dict[str, Any]:
    child = RunnerChild(  # raises SandboxUnavailable: handled by the caller
        sandbox_for(settings, model_format),
        settings.runner_module,
        job_dir,
        time_limit=settings.admission_time_limit,
        use_gpu=False,  # probing needs no GPU, and RLIMIT_AS holds only on the CPU
    )
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
    outcome = child.finish()
    if decision is None:
        log.info("admission ended without a decision: %s", outcome.stderr_tail[-2000:])
        decision = {"status": "rejected", "reason": _reason_without_event(settings, outcome)}
    return decision
