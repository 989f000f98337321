"""Many clients polling the gateway (issue 11): wrk against a real uvicorn on 127.0.0.1.

Starts the gateway as `tightrope serve` does (service.api.server, access log off) on a free
loopback port with a fresh data directory, creates an API key, a ready model and a queued audit
directly in the database, then runs wrk (Debian package `wrk`) for a bounded time per endpoint:

    GET /v1/audits/{id}                      a status poll (200, full body)
    GET /v1/audits/{id} + If-None-Match      a status poll that has not changed (304)
    GET /v1/audits/{id} xN                   polls of N distinct audits in turn (--audits)
    GET /v1/audits                           the list, first page
    GET /healthz                             no database, no key: the floor

and prints requests/s, p50/p99 latency, the count of non-2xx/3xx answers (a 503 `busy` is how
the gateway sheds overload) and socket errors for each, and how fast the next request is served
once the load stops.

The N distinct audits (issue 20): before that run every audit is polled once (the cold round,
timed and printed: each is a database read), so that the run measures pollers in their steady
state; `--no-warmup` measures the cold start instead. While it runs, a writer changes
`--changes` audits a second as a worker does (an UPDATE through the workers' announcing
sessions, service/db/audit_changes.py) and after each change polls that audit until the change
shows: the lag of each (p50, max) is printed with the run. `--subscribed-seconds 0` turns the
gateway's subscription off (poll_cache_seconds alone, as before issue 20).

    .venv/bin/python benchmarks/poll_load.py                      # SQLite in a temp dir
    .venv/bin/python benchmarks/poll_load.py --database-url postgresql+psycopg://...
    .venv/bin/python benchmarks/poll_load.py --connections 64 --seconds 10 --json out.json
    .venv/bin/python benchmarks/poll_load.py --audits 2000 --only-many   # issue 20's goal

Only loopback addresses are ever loaded. Results: docs/benchmarks.md ("Polling clients").
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import update  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from service.db.audit_changes import announcing_sessionmaker  # noqa: E402
from service.db.keys import create_api_key, get_or_create_tenant  # noqa: E402
from service.db.migrate import upgrade_to_head  # noqa: E402
from service.db.session import make_engine  # noqa: E402
from service.db.tables import Audit, Model  # noqa: E402
from service.settings import Settings  # noqa: E402

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ready_model(session: Session, tenant_id: str, name: str = "bench") -> Model:
    """A ready model row with a valid spec (the model routes render it), flushed; no file.
    Also benchmarks/audit_list.py's."""
    model = Model(
        tenant_id=tenant_id,
        name=name,
        spec={"name": name, "task": "reconstruction", "input": "image", "image_shape": [1, 8, 8]},
        format="torchscript",
        sha256="0" * 64,
        size_bytes=1,
        status="ready",
    )
    session.add(model)
    session.flush()
    return model


def seed_rows(session: Session, tenant_name: str) -> tuple[str, str]:
    """A new tenant's key, a ready model and a queued audit: (secret, audit id). Also the
    test suite's poll-load fixture (tests/service/api/test_poll_load.py)."""
    secret = create_api_key(session, tenant_name)
    tenant = get_or_create_tenant(session, tenant_name)
    model = ready_model(session, tenant.id)
    audit = Audit(tenant_id=tenant.id, model_id=model.id, request={}, request_hash="0" * 64)
    session.add(audit)
    session.commit()
    return secret, audit.id


def seed(url: str, extra_audits: int = 0) -> tuple[str, str, list[str]]:
    """Schema at head, then `seed_rows` for a fresh tenant, and `extra_audits` more queued
    audits of its model: (secret, audit id, the extra audits' ids)."""
    upgrade_to_head(url)
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            secret, audit_id = seed_rows(session, f"poll-load-{uuid.uuid4().hex[:8]}")
            first = session.get(Audit, audit_id)
            assert first is not None
            extra = [
                Audit(
                    tenant_id=first.tenant_id,
                    model_id=first.model_id,
                    request={},
                    request_hash="0" * 64,
                )
                for _ in range(extra_audits)
            ]
            session.add_all(extra)
            session.commit()
            return secret, audit_id, [audit.id for audit in extra]
    finally:
        engine.dispose()


def start_gateway(
    data_dir: Path,
    url: str,
    port: int,
    broker: str,
    workers: int,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TIGHTROPE_DATA_DIR": str(data_dir),
        "TIGHTROPE_DATABASE_URL": url,
        "TIGHTROPE_BROKER_URL": broker,
        **(extra_env or {}),
    }
    # As `tightrope serve` runs it (service.api.server: httptools with the header limit), less
    # the access log, which would measure the logging.
    argv = [sys.executable, "-m", "service.api.server", "127.0.0.1", str(port), "--no-access-log"]
    server = subprocess.Popen(
        [*argv, "--workers", str(workers)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None:
            raise SystemExit(server.stderr.read().decode() if server.stderr else "uvicorn died")
        if time.monotonic() > deadline:
            server.terminate()
            raise SystemExit("uvicorn did not start within 60 s")
        time.sleep(0.2)


def latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"unreadable latency {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def run_wrk(
    url: str,
    headers: dict[str, str],
    connections: int,
    threads: int,
    seconds: int,
    paths: list[str] | None = None,
    body: str | None = None,
) -> dict[str, Any]:
    """wrk against `url` (GET, or POST of `body` when given, e.g. JSON with its Content-Type
    in `headers`): requests per second, p50/p99, non-2xx/3xx answers and socket errors."""
    # A Lua `done` hook prints the socket errors (connect, read, write, timeout) as one sum.
    script = (
        "done = function(summary, latency, requests)\n"
        "  io.write('errors ', summary.errors.connect + summary.errors.read +"
        " summary.errors.write + summary.errors.timeout, '\\n')\n"
        "end\n"
    )
    if body is not None:
        script += f"wrk.method = 'POST'\nwrk.body = {json.dumps(body)}\n"
    if paths:  # each request the next of these paths (each wrk thread goes round on its own)
        listed = ", ".join(json.dumps(path) for path in paths)
        script += (
            f"paths = {{{listed}}}\n"
            "counter = 0\n"
            "request = function()\n"
            "  counter = counter + 1\n"
            "  return wrk.format('GET', paths[(counter % #paths) + 1])\n"
            "end\n"
        )
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    argv += ["--timeout", "30s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    try:
        out = subprocess.run(
            [*argv, "-s", lua.name, url],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
    finally:
        os.unlink(lua.name)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"^errors (\d+)", out, re.M)
    if rps is None or p99 is None or p50 is None or total is None:
        raise RuntimeError(f"unreadable wrk output:\n{out}")
    return {
        "requests": int(total.group(1)),
        "requests_per_s": float(rps.group(1)),
        "p50_ms": latency_ms(p50.group(1)),
        "p99_ms": latency_ms(p99.group(1)),
        "non_2xx_3xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": int(errors.group(1)) if errors else 0,
    }


def wait_subscribed(base: str, timeout: float = 30.0) -> bool:
    """Until the gateway reports its subscription to audit changes (/metrics)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            if b"tightrope_poll_cache_subscribed 1.0" in response.read():
                return True
        time.sleep(0.1)
    return False


def warm_up(port: int, paths: list[str], headers: dict[str, str], threads: int = 8) -> float:
    """Poll every path once (a few keep-alive connections): the cold round's seconds."""

    def poll_all(share: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for path in share:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {path} answered {response.status}")
        conn.close()

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(poll_all, [paths[i::threads] for i in range(threads)]))
    return time.monotonic() - started


class ChangeWriter(threading.Thread):
    """Changes `per_second` random audits a second as a worker does (an UPDATE through the
    workers' announcing sessions), and after each polls that audit (its own connection) until
    the change shows: the seconds each change took to show."""

    def __init__(
        self,
        url: str,
        broker: str,
        port: int,
        headers: dict[str, str],
        audits: list[str],
        per_second: float,
    ) -> None:
        super().__init__(daemon=True)
        self.settings = Settings(database_url=url, broker_url=broker)
        self.port, self.headers, self.audits = port, headers, audits
        self.interval = 1.0 / per_second
        self.lags: list[float] = []
        self.unseen = 0  # changes not shown within 5 s
        self.stop = threading.Event()

    def run(self) -> None:
        engine = make_engine(self.settings.resolved_database_url)
        sessions = announcing_sessionmaker(engine, self.settings)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        step = 0
        next_at = time.monotonic()
        try:
            while not self.stop.is_set():
                step += 1
                audit_id = random.choice(self.audits)
                message = f"change {step}"
                with sessions() as session:
                    session.execute(
                        update(Audit).where(Audit.id == audit_id).values(progress_message=message)
                    )
                    session.commit()
                written = time.monotonic()
                while True:
                    conn.request("GET", f"/v1/audits/{audit_id}", headers=self.headers)
                    body = conn.getresponse().read()
                    if json.loads(body)["progress"]["message"] == message:
                        self.lags.append(time.monotonic() - written)
                        break
                    if time.monotonic() - written > 5:
                        self.unseen += 1
                        break
                    time.sleep(0.005)
                next_at += self.interval
                self.stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            conn.close()
            engine.dispose()

    def summary(self) -> dict[str, Any]:
        lags = sorted(self.lags)
        return {
            "changes": len(lags) + self.unseen,
            "unseen_after_5s": self.unseen,
            "lag_p50_ms": round(statistics.median(lags) * 1e3, 1) if lags else None,
            "lag_max_ms": round(lags[-1] * 1e3, 1) if lags else None,
        }


def status_of(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--seconds", type=int, default=10, help="per endpoint (at most 60)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument(
        "--audits",
        type=int,
        default=500,
        help="also poll this many distinct audits in turn (64 CI gates polling their own); 0: no",
    )
    parser.add_argument("--database-url", help="default: SQLite in the fresh data dir")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument(
        "--only-many", action="store_true", help="only the run over the distinct audits"
    )
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="do not poll each of the distinct audits once before their run",
    )
    parser.add_argument(
        "--changes",
        type=float,
        default=20.0,
        help="audits changed a second (as a worker does) during the distinct-audit run, each "
        "timed until a poll shows it; 0: none",
    )
    parser.add_argument("--poll-cache-seconds", help="TIGHTROPE_POLL_CACHE_SECONDS")
    parser.add_argument(
        "--subscribed-seconds",
        help="TIGHTROPE_POLL_CACHE_SUBSCRIBED_SECONDS (0: no subscription to audit changes)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk")
    seconds = max(1, min(args.seconds, 60))

    with tempfile.TemporaryDirectory(prefix="tightrope-poll-") as tmp:
        data_dir = Path(tmp) / "data"
        url = args.database_url or f"sqlite:///{data_dir / 'tightrope.db'}"
        secret, audit_id, many = seed(url, args.audits)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        extra_env = {}
        if args.poll_cache_seconds is not None:
            extra_env["TIGHTROPE_POLL_CACHE_SECONDS"] = args.poll_cache_seconds
        if args.subscribed_seconds is not None:
            extra_env["TIGHTROPE_POLL_CACHE_SUBSCRIBED_SECONDS"] = args.subscribed_seconds
        server = start_gateway(data_dir, url, port, args.broker_url, args.workers, extra_env)
        try:
            subscribed = args.subscribed_seconds != "0" and wait_subscribed(base)
            auth = {"Authorization": f"Bearer {secret}"}
            status, headers = status_of(f"{base}/v1/audits/{audit_id}", auth)
            if status != 200:
                raise SystemExit(f"GET /v1/audits/{audit_id} answered {status}")
            etag = headers.get("ETag") or headers["etag"]
            not_modified = {**auth, "If-None-Match": etag}
            cases = [
                ("GET /v1/audits/{id}", f"/v1/audits/{audit_id}", auth),
                ("GET /v1/audits/{id} (304)", f"/v1/audits/{audit_id}", not_modified),
                ("GET /v1/audits", "/v1/audits", auth),
                ("GET /healthz", "/healthz", {}),
            ]
            if args.only_many:
                cases = []
            polled: dict[str, list[str] | None] = {}
            many_name = f"GET /v1/audits/{{id}} x{len(many)}"
            if many:
                cases.append((many_name, f"/v1/audits/{many[0]}", auth))  # last: its backlog
                polled[many_name] = [f"/v1/audits/{audit}" for audit in many]
            results: dict[str, Any] = {}
            for name, path, hdrs in cases:
                writer = None
                if name == many_name:
                    if args.warmup:
                        cold = warm_up(port, polled[name] or [], hdrs)
                        print(
                            f"cold round: {len(many)} distinct audits polled once in {cold:.1f} s"
                        )
                    if args.changes > 0:
                        writer = ChangeWriter(url, args.broker_url, port, hdrs, many, args.changes)
                        writer.start()
                results[name] = run_wrk(
                    base + path,
                    hdrs,
                    args.connections,
                    args.threads,
                    seconds,
                    paths=polled.get(name),
                )
                if writer is not None:
                    writer.stop.set()
                    writer.join(timeout=30)
                    results[name]["freshness"] = writer.summary()
                started = time.monotonic()
                after, _ = status_of(base + "/v1/audits", auth)
                results[name]["next_request_status"] = after
                results[name]["next_request_ms"] = round((time.monotonic() - started) * 1e3, 1)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()

    backend = url.split(":", 1)[0].split("+", 1)[0]
    print(
        f"backend {backend}, {args.workers} gateway process(es), db_pool_size "
        f"{os.environ.get('TIGHTROPE_DB_POOL_SIZE', 'default')}, "
        f"{args.connections} connections, {args.threads} wrk threads, "
        f"{seconds} s per endpoint, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"poll_cache_seconds {args.poll_cache_seconds or 'default'}, "
        f"poll_cache_subscribed_seconds {args.subscribed_seconds or 'default'}, "
        f"subscribed to audit changes: {'yes' if subscribed else 'no'}"
    )
    columns = ("req/s", "p50 ms", "p99 ms", "non-2xx/3xx", "sock err", "next ms")
    print(f"{'endpoint':28} " + " ".join(f"{c:>11}" for c in columns))
    for name, r in results.items():
        print(
            f"{name:28} {r['requests_per_s']:11.0f} {r['p50_ms']:11.1f} {r['p99_ms']:11.1f} "
            f"{r['non_2xx_3xx']:11d} {r['socket_errors']:11d} {r['next_request_ms']:11.1f}"
        )
        if "freshness" in r:
            f = r["freshness"]
            print(
                f"{'':28} changes written meanwhile: {f['changes']}, shown after p50 "
                f"{f['lag_p50_ms']} ms, max {f['lag_max_ms']} ms, "
                f"not shown within 5 s: {f['unseen_after_5s']}"
            )
    if args.json:
        meta = {
            "backend": backend,
            "workers": args.workers,
            "connections": args.connections,
            "seconds": seconds,
            "subscribed": subscribed,
            "load_average": os.getloadavg()[0],
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
