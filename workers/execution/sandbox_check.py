"""Can this worker sandbox uploaded models? (docs/security.md, "Without bubblewrap")

A worker runs a trivial command in the sandbox when it starts (Sandbox.probe): bubblewrap may
be missing, or installed and not working (no unprivileged user namespaces, a seccomp profile
that refuses them). The outcome goes to the log (an ERROR line when it fails), to every
heartbeat (`worker_heartbeats.sandbox`), hence to /readyz, and to admissions: a worker that
cannot sandbox does not try a `.pt`, `.pt2` or `.onnx` model, but gives it a reason and leaves
it for a worker that can, or rejects it once it has waited settings.sandbox_wait_seconds.
"""

from __future__ import annotations

import logging
import threading
import time

from service.settings import Settings
from workers.execution.heartbeat import SandboxState, sandbox_state, set_sandbox_state
from workers.execution.steps import sandbox_for

log = logging.getLogger(__name__)

# A worker whose probe failed probes again this often (and before an admission that needs the
# sandbox, if the last probe is older): bubblewrap installed (or user namespaces allowed)
# meanwhile needs no restart, and its heartbeat, hence /readyz, says so within this time.
REPROBE_SECONDS = 60.0


def needs_sandbox(settings: Settings, model_format: str) -> bool:
    """Whether admitting or auditing a model of this format runs uploaded code (`.safetensors`
    weights of a registered architecture do not: they run without bubblewrap too)."""
    return settings.sandbox != "off" and model_format != "safetensors"


def probe(settings: Settings) -> SandboxState:
    if settings.sandbox == "off":
        return SandboxState("off")
    try:
        problem = sandbox_for(settings, "torchscript").probe(settings.jobs_dir)
    except Exception as exc:  # e.g. the jobs directory cannot be created
        problem = f"the sandbox probe failed: {exc}"
    return SandboxState("bwrap") if problem is None else SandboxState("unavailable", problem)


def check_sandbox(settings: Settings, name: str) -> SandboxState:
    """The start-up check: probe, say the outcome in the log, keep it for the heartbeat."""
    state = probe(settings)
    if state.status == "off":
        log.warning(
            "worker %s: TIGHTROPE_SANDBOX=off: uploaded models run WITHOUT a sandbox "
            "(unsafe with models from others; docs/security.md)",
            name,
        )
    elif state.works:
        log.info("worker %s: the sandbox works (bubblewrap)", name)
    else:
        log.error(
            "worker %s cannot sandbox models: %s. It admits and audits only .safetensors "
            "models; a .pt, .pt2 or .onnx upload waits for a worker that can and is rejected "
            "%g s after its upload if none does (TIGHTROPE_SANDBOX_WAIT_SECONDS); /readyz "
            'reports it (docs/security.md, "Without bubblewrap")',
            name,
            state.problem,
            settings.sandbox_wait_seconds,
        )
    set_sandbox_state(state)
    return state


def current_state(settings: Settings) -> SandboxState | None:
    """This worker's state for an admission (None: never probed, e.g. a task run in a test):
    probed again when it said unavailable more than REPROBE_SECONDS ago."""
    state = sandbox_state()
    if state is None or state.works or time.monotonic() - state.checked_at < REPROBE_SECONDS:
        return state
    fresh = probe(settings)
    if fresh.works:
        log.warning("the sandbox works now (it did not before): admitting every format again")
    set_sandbox_state(fresh)
    return fresh


def watch_sandbox(settings: Settings, stop: threading.Event | None = None) -> threading.Thread:
    """A daemon thread that probes again every REPROBE_SECONDS while the sandbox is
    unavailable (not in the heartbeat thread: a hung probe must not delay a beat), until
    `stop` is set (a worker never sets it)."""
    stopped = stop or threading.Event()

    def run() -> None:
        while not stopped.wait(REPROBE_SECONDS / 4):
            try:
                current_state(settings)
            except Exception:
                log.exception("the sandbox probe failed")

    thread = threading.Thread(target=run, name="tightrope-sandbox-probe", daemon=True)
    thread.start()
    return thread


def mark_unavailable(problem: str) -> None:
    """A sandbox that failed while in use (bubblewrap removed since the probe): heartbeats say
    so from now on. Outside a worker (never probed: a task run in-process) nothing is kept."""
    if sandbox_state() is None:
        return
    log.error("this worker cannot sandbox models any more: %s", problem)
    set_sandbox_state(SandboxState("unavailable", problem))
