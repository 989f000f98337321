"""A warm runner: the next runner child, started before it is needed.

A runner child spends seconds importing torch and deepinv before it can start its job. A worker
therefore keeps one spare child that has done so: started in the sandbox on an empty job
directory of its own, it has imported the engine and waits on stdin. When the worker needs a
runner (an admission, a plan, shards, a finalising step) and the spare was started the same way
that runner would be (same sandbox, runner module and device), the job's files are moved into
the spare's directory and the spare is told to run it; a new spare is then started for the next
job. Isolation is as strict as for a child started cold: the spare has run nothing, sees only its
own directory, and once given a job it serves that job (and, for shards, its audit's next shards)
and is never handed another audit or tenant. Settings: `warm_runner` (docs/deployment.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid
from pathlib import Path

from service.settings import Settings
from workers.execution.heartbeat import sandbox_state
from workers.sandbox.bubblewrap import Sandbox, SandboxUnavailable
from workers.sandbox.child import QueryAnswerer, RunnerChild, StallLimit

log = logging.getLogger(__name__)

# Only the real runner knows --warm (test doubles of the runner do not).
WARM_RUNNER_MODULE = "workers.sandbox.runner"

_spare: RunnerChild | None = None
# Set by the first start_spare (the worker's start): a process that runs jobs in process (the
# tests, the CLI's in-process audit) keeps no spare unless it asked for one.
_keeping = False
spares_started = 0  # how many spares this worker process started (tests read it)
spares_used = 0  # how many jobs a spare ran (tests and logs read it)


def default_sandbox(settings: Settings) -> Sandbox:
    # Imported here: audit_job imports this module.
    from workers.execution.steps import sandbox_for

    return sandbox_for(settings, "torchscript")


def _same_start(spare: RunnerChild, sandbox: Sandbox, runner_module: str, use_gpu: bool) -> bool:
    """Whether a job's runner would have been started exactly as the spare was. A `.safetensors`
    job (runs_uploaded_code False) differs only where that changes whether it is confined."""
    spare_sandbox = spare.sandbox
    return (
        spare.runner_module == runner_module
        and spare.use_gpu == use_gpu
        and dataclasses.replace(sandbox, runs_uploaded_code=spare_sandbox.runs_uploaded_code)
        == spare_sandbox
        and sandbox.confined() == spare_sandbox.confined()
    )


def start_spare(settings: Settings) -> None:
    """Start this worker's spare unless it has a live one (or warm runners are off). Called from
    the worker's own thread: a child's parent-death signal follows the thread that started it."""
    global _spare, spares_started, _keeping
    if not settings.warm_runner or settings.runner_module != WARM_RUNNER_MODULE:
        return
    _keeping = True
    if _spare is not None and _spare.alive():
        return
    state = sandbox_state()
    if state is not None and not state.works:
        return  # a spare could not start; jobs start cold and say why
    _end(_spare)
    job_dir = settings.jobs_dir / f"warm-{uuid.uuid4().hex}"
    job_dir.mkdir(parents=True)
    try:
        _spare = RunnerChild(
            default_sandbox(settings),
            settings.runner_module,
            job_dir,
            time_limit=0,
            use_gpu=False,
            warm=True,
        )
    except (SandboxUnavailable, OSError) as exc:
        log.info("no warm runner: %s", exc)
        shutil.rmtree(job_dir, ignore_errors=True)
        _spare = None
        return
    spares_started += 1


def replace_spare(settings: Settings) -> None:
    """Start the next spare after a job that took the last one with start_runner(...,
    replace_spare=False); nothing in a process that keeps none (the tests, the CLI)."""
    if _keeping:
        start_spare(settings)


def end_spare(*, stop_keeping: bool = False) -> None:
    """End the spare (the worker stops); with `stop_keeping`, start no other."""
    global _spare, _keeping
    spare, _spare = _spare, None
    _end(spare)
    if stop_keeping:
        _keeping = False


def _end(child: RunnerChild | None) -> None:
    if child is None:
        return
    child.kill()
    child.finish(grace_seconds=5.0)
    shutil.rmtree(child.job_dir, ignore_errors=True)


def _move_contents(source: Path, target: Path) -> None:
    """Move every entry of `source` into `target` (renames: one file system), and remove
    `source`. The target is a spare's directory: empty but for the runner's own scratch in its
    HOME (`.cache`, `.config`, written while it imported). A job directory that a runner used
    before (one kept for an audit's next shard) has such entries too: directories merge, and
    where both hold a file the spare's stays, since the spare may have it open."""
    for entry in os.listdir(source):
        moving, there = source / entry, target / entry
        if not there.exists() and not there.is_symlink():
            os.rename(moving, there)
        elif _plain_dir(moving) and _plain_dir(there):
            _move_contents(moving, there)
        elif _plain_dir(moving):
            shutil.rmtree(moving)
        else:
            moving.unlink()
    source.rmdir()


def _plain_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def start_runner(
    settings: Settings,
    sandbox: Sandbox,
    job_dir: Path,
    *,
    time_limit: float,
    use_gpu: bool,
    serve: bool = False,
    stall_limit: StallLimit | None = None,
    relay: QueryAnswerer | None = None,
    replace_spare: bool = True,
) -> RunnerChild:
    """A runner child running the job in `job_dir`: the warm spare when it fits, else a child
    started now. With the spare, the job's files now live in the spare's directory: the caller
    reads and removes `child.job_dir`, not `job_dir`. Raises SandboxUnavailable as RunnerChild
    does. A new spare is started at once, unless `replace_spare` is False: then the caller
    calls replace_spare once its job is done (a spare importing torch takes a core for
    seconds, which a short job's own work, such as rendering a report, would wait for)."""
    global _spare, spares_used
    child: RunnerChild | None = None
    spare = _spare
    if spare is not None and not spare.alive():
        _spare = None
        _end(spare)
    elif spare is not None and _same_start(spare, sandbox, settings.runner_module, use_gpu):
        _spare = None
        _move_contents(job_dir, spare.job_dir)
        if spare.begin(time_limit, serve=serve, stall_limit=stall_limit):
            child = spare
            spares_used += 1
        else:  # it died meanwhile: the job goes to a new child in the same directory
            spare.kill()
            spare.finish(grace_seconds=5.0)
            job_dir = spare.job_dir
    # (a spare started differently, e.g. for the CPU when this job wants the GPU, stays)
    if child is None:
        child = RunnerChild(
            sandbox,
            settings.runner_module,
            job_dir,
            time_limit=time_limit,
            use_gpu=use_gpu,
            serve=serve,
            stall_limit=stall_limit,
            relay=relay,
        )
    child.relay = relay
    if _keeping and replace_spare:
        start_spare(settings)
    return child
