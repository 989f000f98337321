"""The sandbox, with real bubblewrap: what a child can see, reach, write, and how long and how
much it may run."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from workers.sandbox.bubblewrap import Sandbox, SandboxUnavailable
from workers.sandbox.child import RunnerChild

pytestmark = pytest.mark.needs("bwrap")


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "data"
    job = data / "jobs" / "aud_1-1"
    other = data / "jobs" / "aud_2-1"
    for d in (job, other, data / "blobs", data / "artifacts"):
        d.mkdir(parents=True)
    (data / "tightrope.db").write_text("the database")
    (other / "secret.txt").write_text("another tenant's input")
    (job / "input.txt").write_text("mine")
    return {"data": data, "job": job, "other": other}


def run_in_sandbox(layout: dict[str, Path], code: str, memory: int = 4 << 30) -> dict[str, object]:
    sandbox = Sandbox(mode="bwrap", hidden_dirs=(layout["data"],), memory_bytes=memory)
    proc = sandbox.start([sys.executable, "-c", textwrap.dedent(code)], layout["job"])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


def test_the_network_is_unreachable(layout: dict[str, Path]) -> None:
    result = run_in_sandbox(
        layout,
        """
        import json, socket
        outcome = {}
        for host, port in (("127.0.0.1", 6379), ("127.0.0.1", 5432), ("1.1.1.1", 53)):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect((host, port))
                outcome[f"{host}:{port}"] = "connected"
            except OSError as exc:
                outcome[f"{host}:{port}"] = type(exc).__name__
        print(json.dumps(outcome))
        """,
    )
    assert "connected" not in result.values()
    assert len(result) == 3


def test_the_data_dir_other_jobs_and_the_database_are_invisible(layout: dict[str, Path]) -> None:
    result = run_in_sandbox(
        layout,
        f"""
        import json, os
        print(json.dumps({{
            "data": sorted(os.listdir({str(layout["data"])!r})),
            "jobs": sorted(os.listdir({str(layout["data"] / "jobs")!r})),
            "db": os.path.exists({str(layout["data"] / "tightrope.db")!r}),
            "other": os.path.exists({str(layout["other"] / "secret.txt")!r}),
            "mine": open("input.txt").read(),
            "var": os.path.exists("/var/run"),
        }}))
        """,
    )
    assert result == {
        "data": ["jobs"],
        "jobs": [layout["job"].name],
        "db": False,
        "other": False,
        "mine": "mine",
        "var": False,
    }


def test_only_the_job_dir_and_tmp_are_writable(layout: dict[str, Path]) -> None:
    project_file = Path(__file__).resolve().parent / "sandbox-probe.txt"
    result = run_in_sandbox(
        layout,
        f"""
        import json
        outcome = {{}}
        for path in ("out.txt", "/tmp/x", {str(project_file)!r}, "/usr/x", "/etc/x",
                     {sys.prefix + "/x"!r}):
            try:
                open(path, "w").write("x")
                outcome[path] = "written"
            except OSError as exc:
                outcome[path] = type(exc).__name__
        print(json.dumps(outcome))
        """,
    )
    assert result.pop("out.txt") == "written"
    assert result.pop("/tmp/x") == "written"
    assert set(result.values()) <= {"OSError", "PermissionError", "FileNotFoundError"}
    assert not project_file.exists()
    assert (layout["job"] / "out.txt").read_text() == "x"


def test_the_environment_holds_no_settings_or_secrets(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIGHTROPE_DATABASE_URL", "postgresql://user:hunter2@db/tightrope")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    result = run_in_sandbox(layout, "import json, os; print(json.dumps(dict(os.environ)))")
    assert not any(k.startswith("TIGHTROPE_") for k in result)
    assert "hunter2" not in json.dumps(result)
    assert result["HOME"] == str(layout["job"])


def test_the_time_limit_kills_a_sleeping_child(layout: dict[str, Path]) -> None:
    sandbox = Sandbox(mode="bwrap", hidden_dirs=(layout["data"],), memory_bytes=4 << 30)
    started = time.monotonic()
    child = RunnerChild(
        sandbox, "tests.workers.fakes.sleep", layout["job"], time_limit=2.0, use_gpu=False
    )
    events = [e for e in child.events(tick_seconds=0.2) if e is not None]
    outcome = child.finish()
    assert [e.event for e in events] == ["progress"]
    assert outcome.timed_out and outcome.returncode is not None and outcome.returncode != 0
    assert time.monotonic() - started < 15


def test_the_memory_limit_stops_a_child_that_allocates_too_much(layout: dict[str, Path]) -> None:
    sandbox = Sandbox(mode="bwrap", hidden_dirs=(layout["data"],), memory_bytes=1 << 30)
    child = RunnerChild(
        sandbox, "tests.workers.fakes.hog", layout["job"], time_limit=60.0, use_gpu=False
    )
    events = [e for e in child.events(tick_seconds=0.5) if e is not None]
    outcome = child.finish()
    assert [e.event for e in events] == ["error"]
    assert events[0].info == {"status": 422, "cause": "memory"}
    assert outcome.returncode == 1 and not outcome.timed_out


def test_a_missing_bwrap_refuses_to_run(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("workers.sandbox.bubblewrap.shutil.which", lambda name: None)
    sandbox = Sandbox(mode="bwrap", hidden_dirs=(layout["data"],), memory_bytes=1 << 30)
    with pytest.raises(SandboxUnavailable, match="TIGHTROPE_SANDBOX=off"):
        sandbox.start([sys.executable, "-c", "pass"], layout["job"])
    assert os.listdir(layout["job"]) == ["input.txt"]


def test_without_bwrap_safetensors_still_run_with_a_clean_environment(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`.safetensors` weights of a registered architecture run no uploaded code: a machine
    without bubblewrap may run them, still with a clean environment and rlimits."""
    monkeypatch.setattr("workers.sandbox.bubblewrap.shutil.which", lambda name: None)
    monkeypatch.setenv("TIGHTROPE_SECRET_FOR_TEST", "leak")
    sandbox = Sandbox(
        mode="bwrap",
        hidden_dirs=(layout["data"],),
        memory_bytes=1 << 30,
        runs_uploaded_code=False,
    )
    assert not sandbox.confined()
    proc = sandbox.start(
        [sys.executable, "-c", "import os; print(sorted(k for k in os.environ if 'SECRET' in k))"],
        layout["job"],
    )
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert stdout.decode().strip() == "[]"


def test_with_bwrap_safetensors_are_confined_too(layout: dict[str, Path]) -> None:
    sandbox = Sandbox(
        mode="bwrap",
        hidden_dirs=(layout["data"],),
        memory_bytes=1 << 30,
        runs_uploaded_code=False,
    )
    assert sandbox.confined()
    assert sandbox.command(["true"], layout["job"], use_gpu=False)[0].endswith("bwrap")


def test_software_under_tmp_is_not_hidden_by_the_private_tmp(tmp_path: Path) -> None:
    """A checkout or virtual environment under /tmp (CI clones there) stays visible: the
    private /tmp is mounted before the read-only software binds."""
    from workers.sandbox.bubblewrap import bwrap_command

    cmd = bwrap_command(["true"], tmp_path, hidden_dirs=())
    private_tmp = cmd.index("/tmp") - 1
    assert cmd[private_tmp] == "--tmpfs"
    first_software_bind = min(i for i, arg in enumerate(cmd) if arg in ("--ro-bind", "--symlink"))
    assert private_tmp < first_software_bind


def test_the_gpu_a_worker_is_pinned_to_reaches_the_child(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tightrope worker --gpus` pins each worker with CUDA_VISIBLE_DEVICES (an nvidia-smi
    index, so CUDA_DEVICE_ORDER=PCI_BUS_ID): the runner in the sandbox sees the same GPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    result = run_in_sandbox(layout, "import json, os; print(json.dumps(dict(os.environ)))")
    assert result["CUDA_VISIBLE_DEVICES"] == "1"
    assert result["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_a_gpu_child_gets_every_nvidia_node_and_a_cpu_child_none(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pinned GPU is chosen by CUDA_VISIBLE_DEVICES, not by hiding nodes: a node's number
    is the driver's minor, which need not match the index (see Sandbox.command)."""
    nodes = ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    monkeypatch.setattr("workers.sandbox.bubblewrap.gpu_device_nodes", lambda: nodes)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    sandbox = Sandbox(mode="bwrap", hidden_dirs=(layout["data"],), memory_bytes=1 << 30)

    def bound(cmd: list[str]) -> list[str]:
        return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--dev-bind"]

    assert bound(sandbox.command(["true"], layout["job"], use_gpu=True)) == nodes
    assert bound(sandbox.command(["true"], layout["job"], use_gpu=False)) == []


@pytest.mark.parametrize(
    ("visible", "expected"), [(None, True), ("0", True), ("0,1", True), ("", False), ("-1", False)]
)
def test_has_gpu_respects_a_worker_without_gpu(
    monkeypatch: pytest.MonkeyPatch, visible: str | None, expected: bool
) -> None:
    """The CPU workers of `tightrope worker --gpus` get CUDA_VISIBLE_DEVICES="": an `auto`
    audit they take runs on the CPU and gets no GPU node."""
    from workers.sandbox.bubblewrap import has_gpu

    monkeypatch.setattr("workers.sandbox.bubblewrap.gpu_device_nodes", lambda: ["/dev/nvidia0"])
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert has_gpu() is expected


def test_the_runner_thread_count_is_a_setting(tmp_path: Path) -> None:
    from service.settings import Settings
    from workers.execution.steps import sandbox_for
    from workers.sandbox.bubblewrap import bwrap_command, child_environment

    sandbox = sandbox_for(Settings(data_dir=tmp_path, runner_threads=1), "torchscript")
    assert sandbox.threads == 1
    env = child_environment(tmp_path, sandbox.threads)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    assert child_environment(tmp_path)["OMP_NUM_THREADS"] == "2"  # the default
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # idle threads sleep: no spinning when contended
    cmd = bwrap_command(["true"], tmp_path, hidden_dirs=(), threads=3)
    assert cmd[cmd.index("OMP_NUM_THREADS") + 1] == "3"


# -- the start-up probe (workers.execution.sandbox_check) ----------------------------------


def test_the_probe_runs_a_trivial_command_in_the_real_sandbox(layout: dict[str, Path]) -> None:
    sandbox = Sandbox(mode="bwrap", hidden_dirs=(layout["data"],), memory_bytes=1 << 30)
    assert sandbox.probe(layout["data"] / "jobs") is None
    assert sorted(os.listdir(layout["data"] / "jobs")) == ["aud_1-1", "aud_2-1"]  # cleaned up


def test_the_probe_names_a_missing_bwrap_and_the_setting_that_named_it(
    layout: dict[str, Path],
) -> None:
    missing = str(layout["data"] / "no-such-bwrap")
    sandbox = Sandbox(
        mode="bwrap", hidden_dirs=(layout["data"],), memory_bytes=1 << 30, bwrap=missing
    )
    problem = sandbox.probe(layout["data"] / "jobs")
    assert problem is not None
    assert "is not installed" in problem and missing in problem and "TIGHTROPE_BWRAP" in problem
    with pytest.raises(SandboxUnavailable, match="TIGHTROPE_BWRAP"):
        sandbox.command(["true"], layout["job"], use_gpu=False)


def test_the_probe_catches_a_bwrap_that_is_installed_but_cannot_sandbox(
    layout: dict[str, Path],
) -> None:
    """bubblewrap without unprivileged user namespaces (a container without them, a sysctl)
    is installed and fails every start: the probe says so, in bwrap's own words."""
    fake = layout["data"] / "bwrap"
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    sandbox = Sandbox(
        mode="bwrap", hidden_dirs=(layout["data"],), memory_bytes=1 << 30, bwrap=str(fake)
    )
    problem = sandbox.probe(layout["data"] / "jobs")
    assert problem is not None
    assert "cannot start a sandbox here (exit code 1" in problem
    assert "No permissions to creating new namespace" in problem
