"""The slow-client attack on the gateway, measured: are other clients still answered?

    .venv/bin/python benchmarks/slow_clients.py [--sockets 1100] [--files 1024] [--seconds 20]
        [--gateway FILE]

Starts the gateway as `tightrope serve` does (`python -m service.api.server`, or FILE run as a
script, e.g. an older service/api/server.py taken from git, for a before/after) under an
open-file limit of `--files` (soft and hard, so it cannot raise it), opens `--sockets`
connections from 127.0.0.1 that each send `GET /healthz HTTP/1.1`, `Host` and the start of a
header, then one more byte every 5 s; meanwhile another client, from 127.0.0.2, asks
`/healthz` every 0.2 s with a 2 s time-out. Prints the share of its requests answered, their
p50/p99, and how many of the slow sockets the server closed. Loopback only; bounded in time.
Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(port: int, files: int, gateway: Path | None, data: Path) -> subprocess.Popen:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TIGHTROPE_")},
        "TIGHTROPE_DATA_DIR": str(data),
        "TIGHTROPE_DATABASE_URL": f"sqlite:///{data / 'slow.db'}",
        "PYTHONPATH": str(REPO),
    }
    target = [str(gateway)] if gateway else ["-m", "service.api.server"]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    proc = subprocess.Popen(
        [sys.executable, *target, "127.0.0.1", str(port), "--no-access-log"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(data / "gateway.log", "wb"),  # noqa: SIM115 - the child owns it
        preexec_fn=limit,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the gateway did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=1100)
    parser.add_argument("--files", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--gateway", type=Path, default=None)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.sockets + 256), hard))

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        gateway = start_gateway(port, args.files, args.gateway, Path(tmp))
        slow: list[socket.socket] = []
        try:
            for _ in range(args.sockets):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", port))
                slow.append(sock)
            time.sleep(0.5)
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(SLOW_HEAD)
            client = httpx.Client(
                transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=2.0
            )
            latencies: list[float] = []
            failed = 0
            started = last_trickle = time.monotonic()
            while time.monotonic() - started < args.seconds:
                one = time.monotonic()
                try:
                    ok = client.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.monotonic() - one)
                else:
                    failed += 1
                if time.monotonic() - last_trickle >= 5:
                    last_trickle = time.monotonic()
                    for sock in slow:
                        with contextlib.suppress(OSError):
                            sock.send(b"a")
                time.sleep(0.2)
            client.close()
            closed = 0
            for sock in slow:
                try:
                    data = sock.recv(1)
                    closed += 1 if data == b"" or data else 0
                except BlockingIOError:
                    pass
                except OSError:
                    closed += 1
        finally:
            for sock in slow:
                sock.close()
            gateway.kill()
            gateway.wait()
    total = len(latencies) + failed
    answered = len(latencies) / total if total else 0.0
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 1 else float("nan")
    print(
        f"gateway: {args.gateway or 'service.api.server'}; {args.sockets} slow sockets, "
        f"file limit {args.files}, {args.seconds:g} s"
    )
    print(f"other client answered: {len(latencies)}/{total} = {answered:.1%}")
    print(f"its latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"slow sockets closed by the server: {closed}/{len(slow)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
