"""`tightrope worker` without Celery: the plan of its workers (pure), `--gpus` and GPU discovery
with a fake nvidia-smi, the CLI's options, and the supervisor's restart and stop logic on small
stand-in processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import workers.execution.supervisor
from service.queue.broker import ALL_QUEUES, QUEUE_ADMISSION, QUEUE_CPU, QUEUE_GPU
from workers.cli.main import app
from workers.execution.supervisor import (
    WorkerChild,
    discover_gpus,
    parse_gpus,
    parse_nvidia_smi,
    plan_workers,
    worker_command,
)

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def _summary(children: list[WorkerChild]) -> list[tuple[str, tuple[str, ...], dict[str, str]]]:
    return [(c.hostname, c.queues, dict(c.env)) for c in children]


# --- the plan -----------------------------------------------------------------------------


def test_the_default_plan_is_one_cpu_worker_and_the_admission_worker() -> None:
    assert _summary(plan_workers()) == [
        ("cpu1@%h", (QUEUE_CPU,), {}),
        ("admission@%h", (QUEUE_ADMISSION,), {}),
    ]


def test_two_gpus_and_two_cpu_workers() -> None:
    pinned = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert _summary(plan_workers(gpus=["0", "1"], concurrency=2)) == [
        ("gpu0@%h", (QUEUE_GPU, QUEUE_CPU), {"CUDA_VISIBLE_DEVICES": "0", **pinned}),
        ("gpu1@%h", (QUEUE_GPU, QUEUE_CPU), {"CUDA_VISIBLE_DEVICES": "1", **pinned}),
        ("cpu1@%h", (QUEUE_CPU,), {"CUDA_VISIBLE_DEVICES": ""}),
        ("cpu2@%h", (QUEUE_CPU,), {"CUDA_VISIBLE_DEVICES": ""}),
        ("admission@%h", (QUEUE_ADMISSION,), {"CUDA_VISIBLE_DEVICES": ""}),
    ]


def test_a_second_gpu_host_without_cpu_or_admission_workers() -> None:
    children = plan_workers(gpus=["3"], concurrency=0, admission=False)
    assert [(c.name, c.queues) for c in children] == [("gpu3", (QUEUE_GPU, QUEUE_CPU))]


def test_queues_override_the_cpu_workers_only() -> None:
    children = plan_workers(concurrency=2, queues=["custom", QUEUE_CPU])
    assert [(c.name, c.queues) for c in children] == [
        ("cpu1", ("custom", QUEUE_CPU)),
        ("cpu2", ("custom", QUEUE_CPU)),
        ("admission", (QUEUE_ADMISSION,)),
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"concurrency": 0, "admission": False},
        {"concurrency": -1},
        {"gpus": ["0", "0"]},
    ],
)
def test_impossible_plans_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        plan_workers(**kwargs)


def test_a_child_command_names_its_node_and_queues() -> None:
    child = plan_workers(gpus=["1"], concurrency=0, admission=False)[0]
    command = child.command(["--loglevel", "info"])
    assert command[:3] == [sys.executable, "-m", "celery"]
    assert command[command.index("-Q") + 1] == f"{QUEUE_GPU},{QUEUE_CPU}"
    assert command[command.index("--hostname") + 1] == "gpu1@%h"
    assert command[-2:] == ["--loglevel", "info"]
    assert command[command.index("--pool") + 1] == "solo"


def test_worker_command_reads_every_queue_by_default() -> None:
    command = worker_command(["--loglevel", "info"])
    assert command[command.index("-Q") + 1] == ",".join(ALL_QUEUES)
    only = worker_command([], [QUEUE_ADMISSION])
    assert only[only.index("-Q") + 1] == QUEUE_ADMISSION


# --- --gpus and discovery -----------------------------------------------------------------


def test_parse_gpus() -> None:
    assert parse_gpus("0,1") == ["0", "1"]
    assert parse_gpus(" 2 , 03 ") == ["2", "3"]
    assert parse_gpus("all", discover=lambda: ["0", "1", "2"]) == ["0", "1", "2"]
    assert parse_gpus("ALL", discover=lambda: ["0"]) == ["0"]
    for bad in ("", "x", "0,-1", "0,0", "GPU-1234"):
        with pytest.raises(ValueError):
            parse_gpus(bad)
    with pytest.raises(ValueError, match="no NVIDIA GPU found"):
        parse_gpus("all", discover=lambda: [])


def test_parse_nvidia_smi_output() -> None:
    assert parse_nvidia_smi("0\n1\n") == ["0", "1"]
    assert parse_nvidia_smi(" 0 \r\n 1\n\n") == ["0", "1"]
    assert parse_nvidia_smi("No devices were found\n") == []
    assert parse_nvidia_smi("") == []


def _fake_nvidia_smi(bin_dir: Path, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    return exe


@pytest.fixture
def no_proc_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The driver's /proc folder, replaced by an empty one (the test machine may have GPUs)."""
    folder = tmp_path / "proc-gpus"
    folder.mkdir()
    monkeypatch.setattr(workers.execution.supervisor, "NVIDIA_PROC_GPUS", folder)
    return folder


def test_discovery_asks_nvidia_smi_on_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_proc_gpus: Path
) -> None:
    args_file = tmp_path / "args"
    _fake_nvidia_smi(tmp_path / "bin", f'echo "$@" > {args_file}\nprintf "0\\n1\\n2\\n"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert discover_gpus() == ["0", "1", "2"]
    assert args_file.read_text().split() == ["--query-gpu=index", "--format=csv,noheader"]


def test_discovery_falls_back_to_the_driver_proc_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_proc_gpus: Path
) -> None:
    # nvidia-smi is there but fails (a driver/library mismatch, say)
    _fake_nvidia_smi(tmp_path / "bin", 'echo "Failed to initialize NVML" >&2\nexit 9')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for bus_id in ("0000:b1:00.0", "0000:3b:00.0"):
        (no_proc_gpus / bus_id).mkdir()
    assert discover_gpus() == ["0", "1"]
    # and without nvidia-smi at all
    assert discover_gpus(nvidia_smi=str(tmp_path / "missing")) == ["0", "1"]
    assert discover_gpus(nvidia_smi=str(tmp_path / "missing"), proc_gpus=tmp_path / "no") == []


def test_cli_gpus_all_plans_one_worker_per_gpu_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_proc_gpus: Path
) -> None:
    _fake_nvidia_smi(tmp_path / "bin", 'printf "0\\n1\\n"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = CliRunner().invoke(app, ["worker", "--gpus", "all", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == [
        "gpu0@%h",
        "gpu1@%h",
        "cpu1@%h",
        "admission@%h",
    ]
    assert "CUDA_VISIBLE_DEVICES='1'" in lines[1]


def test_cli_gpus_all_without_a_gpu_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_proc_gpus: Path
) -> None:
    _fake_nvidia_smi(tmp_path / "bin", 'echo "No devices were found"\nexit 6')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = CliRunner().invoke(app, ["worker", "--gpus", "all"])
    assert result.exit_code == 2
    assert "no NVIDIA GPU found" in result.output


def test_cli_passes_its_plan_and_extra_arguments_to_the_supervisor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[list[WorkerChild], list[str]]] = []

    def fake(children: list[WorkerChild], argv: list[str]) -> int:
        calls.append((list(children), list(argv)))
        return 0

    monkeypatch.setattr(workers.execution.supervisor, "supervise_workers", fake)
    result = CliRunner().invoke(
        app,
        [
            "worker",
            "--gpus",
            "0,1",
            "--concurrency",
            "2",
            "--queues",
            "a,b",
            "--no-admission",
            "--without-gossip",
            "--max-tasks-per-child",
            "10",
        ],
    )
    assert result.exit_code == 0, result.output
    [(children, argv)] = calls
    assert [c.name for c in children] == ["gpu0", "gpu1", "cpu1", "cpu2"]
    assert children[2].queues == ("a", "b")
    assert argv == ["--loglevel", "info", "--without-gossip", "--max-tasks-per-child", "10"]


@pytest.mark.parametrize(
    "args",
    [
        ["--concurrency", "0", "--no-admission"],
        ["--gpus", "zero"],
        ["--hostname", "x@y"],
        ["--concurrency", "-1"],
    ],
)
def test_cli_refuses_what_it_cannot_run(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["worker", *args])
    assert result.exit_code == 2, result.output


# --- the supervisor, on stand-in processes --------------------------------------------------

# A stand-in worker: records its pid, then waits; SIGTERM is ignored when told to, SIGQUIT
# always ends it (as Celery's warm and cold shutdowns).
STAND_IN = """
import os, signal, sys, time
log, stubborn = sys.argv[1], sys.argv[2] == "stubborn"
def note(what):
    with open(log, "a") as f:
        f.write(f"{what} {os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\\n")
def on_term(signum, frame):
    note("term")
    if not stubborn:
        sys.exit(0)
def on_quit(signum, frame):
    note("quit")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGQUIT, on_quit)
note("start")
while True:
    time.sleep(0.05)
"""

SUPERVISOR = """
import logging, sys
import workers.execution.supervisor as s
s.INITIAL_BACKOFF_SECONDS = 0.5
logging.basicConfig(level=logging.INFO)
stand_in, folder, modes = sys.argv[1], sys.argv[2], sys.argv[3:]
commands = [
    (f"w{i}", [sys.executable, stand_in, f"{folder}/w{i}.log", mode],
     {"CUDA_VISIBLE_DEVICES": str(i)})
    for i, mode in enumerate(modes)
]
sys.exit(s.Supervisor(commands).run())
"""


def _events(path: Path) -> list[tuple[str, int, str]]:
    if not path.exists():
        return []
    return [
        (kind, int(pid), gpu)
        for kind, pid, gpu in (line.split() for line in path.read_text().splitlines())
    ]


def _wait(predicate: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


def _start_supervisor(tmp_path: Path, *modes: str) -> subprocess.Popen[bytes]:
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(textwrap.dedent(STAND_IN))
    script = tmp_path / "supervisor.py"
    script.write_text(textwrap.dedent(SUPERVISOR))
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.Popen(
        [sys.executable, str(script), str(stand_in), str(tmp_path), *modes],
        env=env,
        cwd=PROJECT_ROOT,
        start_new_session=True,
    )


@pytest.fixture
def cleanup() -> Any:
    started: list[subprocess.Popen[bytes]] = []
    yield started.append
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _starts(path: Path) -> list[int]:
    return [pid for kind, pid, _ in _events(path) if kind == "start"]


def test_each_worker_is_restarted_on_its_own_and_sigterm_stops_all(
    tmp_path: Path, cleanup: Any
) -> None:
    supervisor = _start_supervisor(tmp_path, "polite", "polite")
    cleanup(supervisor)
    w0, w1 = tmp_path / "w0.log", tmp_path / "w1.log"
    _wait(lambda: _starts(w0) and _starts(w1))
    # each got its own environment
    assert _events(w0)[0][2] == "0" and _events(w1)[0][2] == "1"

    first = _starts(w0)[0]
    os.kill(first, signal.SIGKILL)
    _wait(lambda: len(_starts(w0)) == 2)
    assert len(_starts(w1)) == 1  # the other one ran on undisturbed

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=20) == 0
    live = [_starts(w0)[-1], _starts(w1)[-1]]
    for path, pid in zip((w0, w1), live, strict=True):
        assert ("term", pid, path.stem[-1]) in _events(path)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_second_signal_sends_sigquit_to_all(tmp_path: Path, cleanup: Any) -> None:
    supervisor = _start_supervisor(tmp_path, "stubborn", "stubborn")
    cleanup(supervisor)
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    _wait(lambda: all(_starts(p) for p in logs))
    supervisor.send_signal(signal.SIGTERM)
    _wait(lambda: all(any(e[0] == "term" for e in _events(p)) for p in logs))
    time.sleep(0.3)
    assert supervisor.poll() is None  # a warm shutdown waits for the workers
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=20) == 0
    for path in logs:
        assert [e[0] for e in _events(path)] == ["start", "term", "quit"]


def test_a_worker_that_keeps_failing_is_restarted_with_backoff(
    tmp_path: Path, cleanup: Any
) -> None:
    # a crash loop: the worker is killed as soon as it starts, three times
    supervisor = _start_supervisor(tmp_path, "polite")
    cleanup(supervisor)
    log = tmp_path / "w0.log"
    times: list[float] = []
    for n in range(1, 4):
        pid = _wait(lambda n=n: len(_starts(log)) >= n and _starts(log)[n - 1])
        times.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: len(_starts(log)) >= 4)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0  # 0.5 s, then 1 s
    supervisor.send_signal(signal.SIGINT)
    assert supervisor.wait(timeout=20) == 0
