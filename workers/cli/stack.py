"""Start and stop a whole Tightrope on one host: a broker, the gateway, supervised workers.

Used by `tightrope demo` and by the end-to-end tests, so both run the real processes the
README and docker-compose run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _terminate(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class LocalStack:
    data_dir: Path
    broker_url: str | None = None  # None: an own redis-server if installed, else filesystem://
    database_url: str | None = None  # None: the SQLite file in data_dir
    workers: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    # Every process its own data directory, <data_dir>/<process name>, as on machines that share
    # no disk: the files they share go through the object store (TIGHTROPE_STORAGE_URL in
    # extra_env). False: the stack's data directory for all, as on one host.
    private_dirs: bool = False
    api_url: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def process_dir(self, name: str) -> Path:
        """The data directory of the process `name` (its own with private_dirs)."""
        return self.data_dir / name if self.private_dirs else self.data_dir

    def env(self, name: str | None = None) -> dict[str, str]:
        """The environment of the process `name` (None: a command run beside the stack)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIGHTROPE_")}
        env["TIGHTROPE_DATA_DIR"] = str(self.data_dir if name is None else self.process_dir(name))
        if self.broker_url:
            env["TIGHTROPE_BROKER_URL"] = self.broker_url
        if self.database_url:
            env["TIGHTROPE_DATABASE_URL"] = self.database_url
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.process_dir(name).mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv, env=self.env(name), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.processes[name] = proc
        return proc

    def _start_broker(self) -> None:
        if self.broker_url:
            return
        redis_server = shutil.which("redis-server")
        if redis_server:
            port = free_port()
            redis_dir = self.data_dir / "redis"
            redis_dir.mkdir(parents=True, exist_ok=True)
            self._spawn(
                "redis",
                [
                    redis_server,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(redis_dir),
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                ],
            )
            deadline = time.monotonic() + 20
            while not port_open("127.0.0.1", port):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start; see " + str(self.log_dir))
                time.sleep(0.1)
            self.broker_url = f"redis://127.0.0.1:{port}/0"
        else:
            self.broker_url = "filesystem://"

    def start(self, ready_timeout: float = 180.0) -> str:
        """Start everything and wait until /readyz says the stack can run audits."""
        self._launch()
        self.wait_for("/readyz", ready_timeout)
        return self.api_url

    def start_without_ready(self, timeout: float = 60.0) -> str:
        """Start and wait only until the gateway answers (e.g. with no worker at all)."""
        self._launch()
        self.wait_for("/healthz", timeout)
        return self.api_url

    def _launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._start_broker()
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        exe = [sys.executable, "-m", "workers.cli.main"]
        self._spawn("api", [*exe, "serve", "--host", "127.0.0.1", "--port", str(port)])
        for i in range(self.workers):
            self.start_worker(f"worker{i}")

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        # Named after the stack's process name, so two workers of one host are told apart.
        return self._spawn(
            name, [sys.executable, "-m", "workers.cli.main", "worker", "--name", name]
        )

    def wait_for(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if name == "api" and proc.poll() is not None:
                    raise RuntimeError(f"the gateway exited; see {self.log_dir / 'api.log'}")
            try:
                r = httpx.get(self.api_url + path, timeout=2)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.3)
        raise RuntimeError(f"{path} not OK after {timeout:.0f} s: {last}")

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything in its process group (fault tests)."""
        proc = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for name in [n for n in self.processes if n != "redis"] + ["redis"]:
            proc = self.processes.get(name)
            if proc is not None:
                _terminate(proc)
        self.processes.clear()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
