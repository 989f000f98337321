"""Keep Celery workers alive: restart each one whenever it exits, until told to stop.

A worker can die under us (a Redis restart crashes it, the OOM killer, a SIGKILL); the database
keeps the truth, so a fresh worker plus the reconciler is all recovery needs. One supervisor
runs several workers at once (`tightrope worker`: one per GPU, N for the CPU queue, one for
admissions and callbacks), each with its own restart loop and backoff. SIGTERM/SIGINT are
forwarded to every worker (a warm shutdown: the running task finishes); a second one forwards
SIGQUIT (cold shutdown: the task's lease then expires and the reconciler re-enqueues it). The
supervisor exits once all of them have stopped.

Which workers a host runs is planned by `plan_workers`, a pure function; GPUs are found by
`discover_gpus` without importing torch (nvidia-smi, else /proc/driver/nvidia/gpus).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from service.queue.broker import ALL_QUEUES, QUEUE_ADMISSION, QUEUE_CPU, QUEUE_GPU
from workers.sandbox.bubblewrap import set_parent_death_signal

log = logging.getLogger(__name__)

INITIAL_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
HEALTHY_RUN_SECONDS = 60.0  # a worker that ran this long resets the backoff
TICK_SECONDS = 0.1

NVIDIA_PROC_GPUS = Path("/proc/driver/nvidia/gpus")
NVIDIA_SMI_TIMEOUT_SECONDS = 30.0


def worker_command(argv: Sequence[str], queues: Sequence[str] = ALL_QUEUES) -> list[str]:
    """`celery worker` (solo pool, one task at a time) reading `queues`, plus `argv`."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.execution.celery_app",
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "-Q",
        ",".join(queues),
        *argv,
    ]


# --- planning: which workers a host runs (pure) -------------------------------------------


@dataclass(frozen=True)
class WorkerChild:
    """One supervised Celery worker: its node name (before the `@`), the queues it reads in
    order, and the environment it gets on top of the supervisor's."""

    name: str
    queues: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return f"{self.name}@%h"  # Celery expands %h to the host's name

    def command(self, argv: Sequence[str] = ()) -> list[str]:
        return worker_command(["--hostname", self.hostname, *argv], self.queues)


def plan_workers(
    *,
    gpus: Sequence[str] = (),
    concurrency: int = 1,
    queues: Sequence[str] | None = None,
    admission: bool = True,
) -> list[WorkerChild]:
    """The workers of one `tightrope worker`: one per GPU in `gpus` (pinned to it with
    CUDA_VISIBLE_DEVICES, reading the GPU queue first, then the CPU queue), `concurrency`
    CPU workers (reading `queues`, default the CPU queue) and, with `admission`, one worker
    that reads only the admission queue, so that a long audit never delays an admission or a
    callback.

    When the plan has GPU workers, the others get CUDA_VISIBLE_DEVICES="" (no GPU): the GPUs
    belong to their own workers, and an `auto` audit a CPU worker takes then runs on the CPU.
    GPU indices are nvidia-smi's, which count in PCI bus order; CUDA counts fastest first
    unless CUDA_DEVICE_ORDER=PCI_BUS_ID, so that is set too.
    """
    if concurrency < 0:
        raise ValueError("concurrency must be 0 or more")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"a GPU is named twice: {','.join(gpus)}")
    cpu_queues = tuple(queues) if queues else (QUEUE_CPU,)
    no_gpu: dict[str, str] = {"CUDA_VISIBLE_DEVICES": ""} if gpus else {}
    children = [
        WorkerChild(
            name=f"gpu{index}",
            queues=(QUEUE_GPU, QUEUE_CPU),
            env={"CUDA_VISIBLE_DEVICES": index, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        )
        for index in gpus
    ]
    children += [
        WorkerChild(name=f"cpu{n}", queues=cpu_queues, env=dict(no_gpu))
        for n in range(1, concurrency + 1)
    ]
    if admission:
        children.append(WorkerChild(name="admission", queues=(QUEUE_ADMISSION,), env=no_gpu))
    if not children:
        raise ValueError("no worker to run: give --gpus, a --concurrency above 0, or admission")
    return children


def parse_gpus(value: str, discover: Callable[[], list[str]] | None = None) -> list[str]:
    """`--gpus`: "all" (every GPU found, an error when there is none) or indices "0,1,...".
    Raises ValueError with a message for the user."""
    value = value.strip()
    if value.lower() == "all":
        found = (discover or discover_gpus)()
        if not found:
            raise ValueError(
                "--gpus all: no NVIDIA GPU found (neither nvidia-smi nor "
                f"{NVIDIA_PROC_GPUS} lists one)"
            )
        return found
    indices = [part.strip() for part in value.split(",") if part.strip()]
    bad = [part for part in indices if not part.isdigit()]
    if not indices or bad:
        raise ValueError(f"--gpus takes `all` or GPU indices such as 0,1; got {value!r}")
    normalised = [str(int(part)) for part in indices]
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"--gpus names a GPU twice: {value!r}")
    return normalised


# --- GPU discovery (no torch) -------------------------------------------------------------


def parse_nvidia_smi(output: str) -> list[str]:
    """The indices of `nvidia-smi --query-gpu=index --format=csv,noheader` (one a line)."""
    return [line.strip() for line in output.splitlines() if re.fullmatch(r"\d+", line.strip())]


def discover_gpus(nvidia_smi: str | None = None, proc_gpus: Path | None = None) -> list[str]:
    """The indices of this machine's NVIDIA GPUs, as nvidia-smi numbers them, without torch.

    nvidia-smi first; without it (or when it fails), the driver's /proc entries, one folder
    per GPU named by its PCI bus id: nvidia-smi's indices follow the PCI bus order, so the
    sorted folders are 0, 1, ... (a container sees only its own GPUs in both places).
    """
    proc_gpus = proc_gpus or NVIDIA_PROC_GPUS
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if exe is not None:
        try:
            result = subprocess.run(
                [exe, "--query-gpu=index", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=NVIDIA_SMI_TIMEOUT_SECONDS,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("nvidia-smi failed (%s); looking in %s", exc, proc_gpus)
        else:
            found = parse_nvidia_smi(result.stdout) if result.returncode == 0 else []
            if found:
                return found
            log.warning(
                "nvidia-smi exited %d listing no GPU; looking in %s", result.returncode, proc_gpus
            )
    try:
        entries = sorted(p.name for p in proc_gpus.iterdir())
    except OSError:
        return []
    return [str(i) for i in range(len(entries))]


# --- supervision --------------------------------------------------------------------------


@dataclass
class _Slot:
    """One supervised process and its restart state."""

    label: str
    command: list[str]
    env: dict[str, str] | None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = INITIAL_BACKOFF_SECONDS
    restart_at: float | None = None
    signals_sent: int = 0
    stop_code: int = 0  # its exit status once stopping began


class Supervisor:
    """Run `commands` (label, argv, extra environment or None) and restart each one whenever
    it exits, with its own exponential backoff, until SIGTERM/SIGINT."""

    def __init__(self, commands: Sequence[tuple[str, Sequence[str], Mapping[str, str] | None]]):
        self.slots = [
            _Slot(label, list(argv), {**os.environ, **env} if env else None)
            for label, argv, env in commands
        ]
        self.stop_signals = 0
        self.first_signal = signal.SIGTERM

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only counted here; the loop forwards it (also to a worker started while it came in).
        if self.stop_signals == 0:
            self.first_signal = signal.Signals(signum)
        self.stop_signals += 1

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self, slot: _Slot) -> None:
        slot.started = time.monotonic()
        slot.restart_at = None
        # The worker dies with the supervisor, so a killed supervisor leaves no orphan.
        slot.proc = subprocess.Popen(slot.command, env=slot.env, preexec_fn=set_parent_death_signal)
        log.info("started celery worker %s, pid %d", slot.label, slot.proc.pid)

    def _forward(self, slot: _Slot) -> None:
        if slot.proc is None or slot.signals_sent >= self.stop_signals:
            return
        forward = self.first_signal if self.stop_signals == 1 else signal.SIGQUIT
        slot.signals_sent = self.stop_signals
        if slot.proc.poll() is None:
            slot.proc.send_signal(forward)

    def _reap(self, slot: _Slot, now: float) -> None:
        if slot.proc is None or (code := slot.proc.poll()) is None:
            return
        slot.proc = None
        if self.stop_signals:
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                slot.stop_code = code
            return
        if now - slot.started >= HEALTHY_RUN_SECONDS:
            slot.backoff = INITIAL_BACKOFF_SECONDS
        log.warning(
            "celery worker %s exited with %s; restarting in %.0f s", slot.label, code, slot.backoff
        )
        slot.restart_at = now + slot.backoff
        slot.backoff = min(slot.backoff * 2, MAX_BACKOFF_SECONDS)

    def _loop(self) -> int:
        for slot in self.slots:
            if not self.stop_signals:
                self._start(slot)
        while True:
            now = time.monotonic()
            for slot in self.slots:
                self._forward(slot)
                self._reap(slot, now)
                due = slot.restart_at is not None and now >= slot.restart_at
                if slot.proc is None and due and not self.stop_signals:
                    self._start(slot)
            if self.stop_signals and all(slot.proc is None for slot in self.slots):
                return next((s.stop_code for s in self.slots if s.stop_code), 0)
            time.sleep(TICK_SECONDS)


def supervise(argv: Sequence[str], queues: Sequence[str] = ALL_QUEUES) -> int:
    """Run one `celery worker` reading `queues` with extra arguments `argv`, and restart it
    until SIGTERM/SIGINT."""
    return Supervisor([("celery", worker_command(argv, queues), None)]).run()


def supervise_workers(children: Sequence[WorkerChild], argv: Sequence[str] = ()) -> int:
    """Run every worker of a plan (extra Celery arguments `argv` for each) until
    SIGTERM/SIGINT; the exit status is 0 when all stopped cleanly."""
    return Supervisor([(c.name, c.command(argv), c.env) for c in children]).run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(supervise(sys.argv[1:]))
