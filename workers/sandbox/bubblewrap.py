"""Build and start the sandbox that runs uploaded models (docs/security.md, "The sandbox").

The runner child runs under bubblewrap: every namespace unshared (no network but a private
loopback), only the installed software visible and read-only, a private /tmp, the job directory
as the only writable place, the data directory (database, blobs, artifacts, other jobs) hidden,
a clean environment, and rlimits. `sandbox="off"` runs the same command without bubblewrap: it
is for development machines only and is unsafe with untrusted models.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import workers

# The project root (the parent of the `workers` package): needed read-only in the sandbox so the
# runner and the engine can be imported whether the project is installed editable or not.
PROJECT_ROOT = Path(workers.__file__).resolve().parent.parent

# System directories the interpreter and its libraries need; symlinks (merged /usr) are recreated
# as symlinks, directories are bound read-only. /etc holds the dynamic linker's cache and
# locale/timezone data.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")

MAX_OPEN_FILES = 4096
MAX_PROCESSES = 4096
MAX_FILE_BYTES = 16 * 1024 * 1024 * 1024
THREADS_PER_CHILD = 2  # the default of TIGHTROPE_RUNNER_THREADS

_PR_SET_PDEATHSIG = 1

# The start-up probe (Sandbox.probe): a trivial command in the sandbox must end within this time.
PROBE_TIMEOUT_SECONDS = 20.0


class SandboxUnavailable(RuntimeError):
    """bubblewrap is required but missing or not working: refuse to run uploaded code
    unconfined."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int | None  # RLIMIT_AS; None where CUDA needs a huge virtual address space
    max_file_bytes: int = MAX_FILE_BYTES
    max_open_files: int = MAX_OPEN_FILES
    max_processes: int = MAX_PROCESSES


def gpu_device_nodes() -> list[str]:
    """NVIDIA device nodes present on this machine (bound into the sandbox)."""
    return sorted(glob.glob("/dev/nvidia*")) + sorted(glob.glob("/dev/dri/*"))


def has_gpu() -> bool:
    """Whether this worker may use a GPU: a device node exists and CUDA_VISIBLE_DEVICES does not
    hide them all (`tightrope worker --gpus` gives its CPU workers an empty one)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(Path(p).name.startswith("nvidia") for p in gpu_device_nodes())


def child_environment(job_dir: Path, threads: int = THREADS_PER_CHILD) -> dict[str, str]:
    """The whole environment of the child: no TIGHTROPE_* settings, no credentials."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(job_dir),
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(PROJECT_ROOT),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        # Idle OpenMP threads sleep instead of spinning: with more runnable threads than cores
        # (several workers, or a worker beside other work) spinning threads starve the ones
        # with work, and a small network's call took 0.4-1.0 s instead of 0.04 s on a 2-core
        # machine (docs/benchmarks.md, "Idle OpenMP threads").
        "OMP_WAIT_POLICY": "PASSIVE",
        "MPLCONFIGDIR": str(job_dir / ".matplotlib"),
        "MPLBACKEND": "Agg",
    }
    # Which GPU this worker may use is deployment configuration, not a secret: a worker of
    # `tightrope worker --gpus` is pinned by CUDA_VISIBLE_DEVICES (an nvidia-smi index, hence
    # CUDA_DEVICE_ORDER=PCI_BUS_ID), and the runner must see the same GPU.
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _read_only_paths() -> list[str]:
    """Installed software: system directories, the interpreter, the venv and the project."""
    paths = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    for extra in (sys.base_prefix, sys.prefix, str(PROJECT_ROOT)):
        real = os.path.realpath(extra)
        if not any(real == p or real.startswith(p + "/") for p in paths):
            paths.append(real)
    return paths


def bwrap_command(
    argv: Sequence[str],
    job_dir: Path,
    hidden_dirs: Sequence[Path],
    *,
    gpu_nodes: Sequence[str] = (),
    bwrap: str = "bwrap",
    threads: int = THREADS_PER_CHILD,
) -> list[str]:
    """The bubblewrap command line that runs `argv` with `job_dir` as its only writable place.

    `hidden_dirs` (the data directory) are covered with an empty tmpfs *after* the read-only
    binds, since they may sit inside a bound directory (the project); the job directory is bound
    back last, so it is the only part of them that shows.
    """
    job = str(job_dir.resolve())
    cmd = [
        bwrap,
        "--unshare-all",  # network, pid, ipc, uts, cgroup (and user where possible)
        "--unshare-net",
        "--unshare-pid",
        "--die-with-parent",
        "--new-session",  # no TIOCSTI into the worker's terminal
        "--cap-drop",
        "ALL",
        "--hostname",
        "sandbox",
    ]
    # the private /tmp first: the software binds below may live under /tmp (a checkout or a
    # virtual environment there) and must not be covered by it
    cmd += ["--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev"]
    for path in _read_only_paths():
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        else:
            cmd += ["--ro-bind", path, path]
    for node in gpu_nodes:
        cmd += ["--dev-bind", node, node]
    for hidden in hidden_dirs:
        cmd += ["--tmpfs", str(hidden.resolve())]
    cmd += ["--bind", job, job, "--chdir", job, "--clearenv"]
    for name, value in child_environment(job_dir, threads).items():
        cmd += ["--setenv", name, value]
    cmd += ["--", *argv]
    return cmd


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to kill this process when its parent dies (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def limits_preexec(limits: SandboxLimits) -> Callable[[], None]:
    """A preexec_fn: rlimits and the parent-death signal, applied between fork and exec."""

    def apply() -> None:
        set_parent_death_signal()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
        if limits.memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))

    return apply


@dataclass(frozen=True)
class Sandbox:
    """How children are started: `mode` "bwrap" (the default) or "off" (unsafe, development)."""

    mode: Literal["bwrap", "off"]
    hidden_dirs: tuple[Path, ...]
    memory_bytes: int
    # False for `.safetensors` weights of a registered architecture: only our own code runs, so
    # a machine without bubblewrap may still run them (clean environment and rlimits kept).
    runs_uploaded_code: bool = True
    threads: int = THREADS_PER_CHILD  # OMP/MKL/OpenBLAS threads of a child
    bwrap: str = "bwrap"  # TIGHTROPE_BWRAP: a name looked up on PATH, or a path

    def confined(self) -> bool:
        """Whether children run inside bubblewrap."""
        if self.mode == "off":
            return False
        return self.runs_uploaded_code or shutil.which(self.bwrap) is not None

    def missing(self) -> str:
        """Why bubblewrap cannot be found, as a sentence an operator can act on."""
        named = "bwrap" if self.bwrap == "bwrap" else f"bwrap at {self.bwrap!r} (TIGHTROPE_BWRAP)"
        return (
            f"bubblewrap ({named}) is not installed: install it (the `bubblewrap` package), "
            "or set TIGHTROPE_SANDBOX=off on a development machine (unsafe: uploaded models "
            "then run unconfined)"
        )

    def command(self, argv: Sequence[str], job_dir: Path, *, use_gpu: bool) -> list[str]:
        if not self.confined():
            return list(argv)
        bwrap = shutil.which(self.bwrap)
        if bwrap is None:
            raise SandboxUnavailable(self.missing())
        # Every NVIDIA node is bound, not only the pinned GPU's /dev/nvidiaN: the N of a node is
        # the driver's minor number, which need not match an nvidia-smi or CUDA index, and CUDA
        # run with some nodes missing may fail to start rather than skip them. The GPU is chosen
        # by CUDA_VISIBLE_DEVICES (passed on by child_environment), as outside the sandbox. It
        # places the audit but does not confine it: uploaded code could use another GPU, which
        # costs that GPU's worker memory and time but shows it nothing (CUDA contexts are
        # isolated from each other).
        nodes = gpu_device_nodes() if use_gpu else []
        return bwrap_command(
            argv, job_dir, self.hidden_dirs, gpu_nodes=nodes, bwrap=bwrap, threads=self.threads
        )

    def probe(self, parent: Path, timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
        """Run a trivial command (the interpreter, doing nothing) in the sandbox the runner
        gets, in a job directory made under `parent`: None when it works, otherwise why not.

        bubblewrap may be installed and still fail: unprivileged user namespaces turned off
        (`kernel.unprivileged_userns_clone=0`, a container without them), a seccomp profile
        that refuses `unshare`, a binary that is not bubblewrap at all.
        """
        if self.mode == "off":
            return None
        bwrap = shutil.which(self.bwrap)
        if bwrap is None:
            return self.missing()
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sandbox-probe-", dir=parent) as job:
            argv = [sys.executable, "-I", "-S", "-c", "pass"]
            command = bwrap_command(argv, Path(job), self.hidden_dirs, bwrap=bwrap, threads=1)
            try:
                done = subprocess.run(
                    command,
                    cwd=job,
                    env={"PATH": "/usr/bin:/bin"},
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=timeout,
                    preexec_fn=limits_preexec(self.limits(use_gpu=False)),
                    start_new_session=True,
                    close_fds=True,
                )
            except subprocess.TimeoutExpired:
                return f"bubblewrap ({bwrap}) did not run a trivial command within {timeout:g} s"
            except OSError as exc:
                return f"bubblewrap ({bwrap}) could not be started: {exc}"
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            said = f": {lines[-1][:300]}" if lines else ""
            return (
                f"bubblewrap ({bwrap}) cannot start a sandbox here (exit code "
                f"{done.returncode}{said})"
            )
        return None

    def limits(self, *, use_gpu: bool) -> SandboxLimits:
        # CUDA reserves tens of GiB of virtual address space: RLIMIT_AS would break it.
        return SandboxLimits(memory_bytes=None if use_gpu else self.memory_bytes)

    def start(
        self, argv: Sequence[str], job_dir: Path, *, use_gpu: bool = False, stdin: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start `argv` confined to `job_dir`; stdout is a pipe (JSON lines), stderr too, and
        stdin a pipe when asked (a kept runner reads its next job's signal there)."""
        command = self.command(argv, job_dir, use_gpu=use_gpu)
        env = (
            child_environment(job_dir, self.threads)
            if not self.confined()
            else {"PATH": "/usr/bin:/bin"}
        )
        return subprocess.Popen(
            command,
            cwd=job_dir,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=limits_preexec(self.limits(use_gpu=use_gpu)),
            start_new_session=True,  # its own process group, killed as a whole
            close_fds=True,
        )


def kill_process_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the child and everything it started (bwrap's pid namespace dies with it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
