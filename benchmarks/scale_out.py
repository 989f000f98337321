"""Scale-out: one audit spread over K workers, against the same audit on one worker.

    .venv/bin/python benchmarks/scale_out.py                    # K = 1, then K = 2; SQLite
    .venv/bin/python benchmarks/scale_out.py --workers 1,2,4 --images 16
    .venv/bin/python benchmarks/scale_out.py --database postgresql
    .venv/bin/python benchmarks/scale_out.py --quick            # a smoke check, 1-2.5 min

It starts a whole local Tightrope (workers.cli.stack.LocalStack: the gateway, the local Redis on its
own database `--redis-db`, flushed first, and a fresh database: SQLite in a temporary directory
or a throw-away PostgreSQL database), uploads the reference U-Net (examples/reference/
model.safetensors, the network of docs/case-study.md) and waits for its admission. Then, for
each K, it starts a fresh `tightrope worker --concurrency K` (K CPU Celery workers and one
admission worker) in place of the previous one, submits ONE audit and times it from the submit
to `succeeded` (the upload, the admission and the worker start are not counted). The audit is a
`worst_case` check (fixed steps, no early stopping) on `--images` ellipse phantoms of the
reference case (64×64, MRI ×4) with `budget.images_per_shard` 1: one shard per image.

Every worker is single-threaded, so that K workers use K cores: the stack runs with
TIGHTROPE_RUNNER_THREADS=1 (the OMP/MKL/OpenBLAS threads of each sandboxed runner); the
runner processes seen during the run are sampled from /proc and their OMP_NUM_THREADS is
printed to prove it.

Prints per K: seconds, speed-up t1/tK, efficiency speed-up/K against the goal (efficiency
≥ 0.8, i.e. speed-up ≥ 0.8·K), where the time went (queue + plan, the shard phase, the
finalising merge; seconds per shard; the runner children's wall and CPU seconds, how many ran
at once, the cores they used; the whole machine's CPU use and load) and whether every report's
`checks` equal the one-worker report's. The exit status is 0 whether or not the goal is met
(it is a measurement); 1 only when an audit fails or the reports differ.
Results: docs/benchmarks.md ("Scale-out: one audit over K workers").
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from service.db.session import make_engine  # noqa: E402
from service.db.tables import Audit, AuditShard, WorkerHeartbeat, utcnow  # noqa: E402
from workers.cli.client import TightropeClient  # noqa: E402
from workers.cli.stack import LocalStack  # noqa: E402

REFERENCE = REPO / "examples" / "reference"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
GOAL_EFFICIENCY = 0.8
WORKER = "worker0"  # the stack's one `tightrope worker` process
TICKS = os.sysconf("SC_CLK_TCK")

# What a shard child imports before it computes anything (workers.sandbox.runner -> engine).
IMPORT_PROBE = (
    "import time; t = time.perf_counter(); import torch; a = time.perf_counter() - t; "
    "import workers.sandbox.runner; from workers.engine import entry_points; "
    "import workers.engine.audit; "
    "from workers.engine.registry import get_check; get_check('worst_case'); "
    "print(a, time.perf_counter() - t)"
)


def audit_config(images: int, steps: int, levels: list[float]) -> dict[str, Any]:
    """The reference case's data and operator (examples/reference/audit.json), one worst_case
    check with fixed work (no early stopping), one image per shard."""
    return {
        "dataset": {"builtin": "ellipses", "count": images, "size": 64, "seed": 0},
        "operator": {
            "kind": "mri",
            "mask": "cartesian",
            "acceleration": 4,
            "center_fraction": 0.08,
            "seed": 0,
        },
        "checks": [
            {
                "kind": "worst_case",
                "levels": levels,
                "steps": steps,
                "restarts": 4,
                "early_stop_tolerance": 0.0,
            }
        ],
        "seed": 0,
        "device": "cpu",
        "budget": {"images_per_shard": 1},
    }


# --- sampling: runner children and CPU --------------------------------------------------------


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


@dataclass
class RunnerSampler:
    """Samples /proc for runner children (`python -m workers.sandbox.runner <job dir>` under
    data_dir):
    how many run at once, their OMP_NUM_THREADS, and their lifetimes by job kind."""

    data_dir: Path
    interval: float = 0.2
    max_at_once: int = 0
    threads: set[str] = field(default_factory=set)
    seen: dict[int, dict[str, Any]] = field(default_factory=dict)  # pid -> first/last/job
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RunnerSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            found = self._scan()
            # a runner's own fork (before it execs something else) has the same command line
            runners = {pid: v for pid, v in found.items() if v[0] not in found}
            for pid, (_, job, cpu) in runners.items():
                info = self.seen.setdefault(pid, {"first": now, "job": job})
                info["last"], info["cpu"] = now, cpu
                if "threads" not in info:
                    with contextlib.suppress(OSError):
                        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                            if item.startswith(b"OMP_NUM_THREADS="):
                                info["threads"] = item.split(b"=", 1)[1].decode()
                                self.threads.add(info["threads"])
            self.max_at_once = max(self.max_at_once, len(runners))
            self._stop.wait(self.interval)

    def _scan(self) -> dict[int, tuple[int, str, float]]:
        """pid -> (parent pid, job directory name, CPU seconds) of every runner process."""
        marker = str(self.data_dir)
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                text = [a.decode(errors="replace") for a in argv if a]
                if (
                    len(text) < 4
                    or text[0].endswith("bwrap")
                    or text[1:3] != ["-m", "workers.sandbox.runner"]
                    or not text[3].startswith(marker)
                ):
                    continue
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu = (int(stat[11]) + int(stat[12])) / TICKS
            found[int(entry)] = (int(stat[1]), Path(text[3]).name, cpu)
        return found

    def lifetimes(self, kind: str) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of each runner child of this job kind (`shards`, or the plan
        and finalising children), start to exit as sampled."""
        out = []
        for info in sorted(self.seen.values(), key=lambda i: i["first"]):
            if (kind == "shards") == ("-shards-" in info["job"]):
                wall = info["last"] - info["first"] + self.interval / 2
                out.append((wall, info.get("cpu", 0.0)))
        return out


# --- databases ----------------------------------------------------------------------------


@contextlib.contextmanager
def database(kind: str, data_dir: Path, admin_url: str) -> Iterator[str]:
    """A fresh database: a SQLite file in data_dir, or a throw-away PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite:///{data_dir / 'tightrope.db'}"
        return
    import psycopg

    name = f"tightrope_scale_out_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- one run ------------------------------------------------------------------------------


@dataclass
class RunResult:
    workers: int
    seconds: float  # submit -> succeeded, seen by the client
    checks: list[dict[str, Any]]
    verdict: str
    shards: int
    plan_seconds: float  # submit -> shards stored (queue wait + the plan child)
    shard_phase_seconds: float  # shards stored -> last shard stored
    finalise_seconds: float  # last shard stored -> succeeded
    per_worker: dict[str, int]
    seconds_per_shard: float  # shard phase × K / shards: one worker's time per shard
    shard_children: int  # runner processes that ran shards (one per shard, or a kept child)
    cpu_per_shard: float  # their CPU seconds (user + system) / shards
    other_children: list[tuple[float, float]]  # plan and finalise children: wall, CPU
    runners_at_once: int
    runner_threads: list[str]
    cpu_busy: float  # fraction of the machine's CPUs busy during the audit
    runner_cores: float  # CPU seconds of all the audit's runner children / wall seconds
    load: tuple[float, float]  # 1-minute load average before / after


@dataclass
class KWorkerStack(LocalStack):
    """LocalStack whose one `tightrope worker` runs `concurrency` CPU workers (cpu1..cpuK)."""

    concurrency: int = 1
    used: bool = False  # the worker process has run an audit
    worker_since: datetime = field(default_factory=utcnow)  # its start

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        self.worker_since = utcnow()
        argv = ["worker", "--concurrency", str(self.concurrency)]
        return self._spawn(name, [sys.executable, "-m", "workers.cli.main", *argv])


def upload_reference(client: TightropeClient) -> str:
    spec = json.loads((REFERENCE / "spec.json").read_text())
    uploaded = client.upload_model(REFERENCE / "model.safetensors", spec)
    model = client.wait_model(uploaded["id"], timeout=600)
    if model["status"] != "ready":
        raise SystemExit(f"the reference model was not admitted: {model}")
    return str(model["id"])


def create_key(stack: LocalStack) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "keys", "create", "--tenant", "scale-out"],
        env=stack.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def wait_for_workers(url: str, count: int, since: datetime, timeout: float = 180.0) -> None:
    """Until `count` workers wrote a heartbeat after `since` (readiness needs only one)."""
    engine = make_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with Session(engine) as session:
                query = select(WorkerHeartbeat.name).where(WorkerHeartbeat.last_seen >= since)
                names = set(session.scalars(query).all())
            if len(names) >= count:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"only {sorted(names)} of {count} workers reported")
            time.sleep(0.3)
    finally:
        engine.dispose()


def use_workers(stack: KWorkerStack, k: int) -> None:
    """Replace the stack's `tightrope worker` by one with K CPU workers (kept when it has K
    and has run no audit yet: the first K); wait for all."""
    running = stack.processes.get(WORKER)
    keep = stack.concurrency == k and not stack.used and running and running.poll() is None
    stack.used = True
    if not keep:
        old = stack.processes.pop(WORKER, None)
        if old is not None and old.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(old.pid, signal.SIGTERM)  # a warm shutdown: nothing is running
            try:
                old.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(old.pid, signal.SIGKILL)
                old.wait(timeout=10)
        stack.concurrency = k
        stack.start_worker(WORKER)
    assert stack.database_url is not None
    wait_for_workers(stack.database_url, k + 1, stack.worker_since)


def timeline(url: str, audit_id: str) -> tuple[Audit, list[AuditShard]]:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            audit = session.get(Audit, audit_id)
            shards = list(
                session.scalars(select(AuditShard).where(AuditShard.audit_id == audit_id)).all()
            )
            assert audit is not None
            session.expunge_all()
            return audit, shards
    finally:
        engine.dispose()


def run_once(
    k: int, stack: KWorkerStack, client: TightropeClient, model_id: str, config: dict[str, Any]
) -> RunResult:
    """One audit on K workers: submit, wait for `succeeded`, read the report and the rows."""
    use_workers(stack, k)
    assert stack.database_url is not None
    load_before = os.getloadavg()[0]
    busy0, total0 = _cpu_times()
    with RunnerSampler(stack.data_dir) as sampler:
        started = time.monotonic()
        submitted = client.submit_audit({**config, "model_id": model_id})
        final = client.wait_audit(submitted["id"], timeout=3600, poll=0.1)
        seconds = time.monotonic() - started
    busy1, total1 = _cpu_times()
    if final["status"] != "succeeded":
        raise SystemExit(f"K={k}: the audit ended {final['status']}: {final}")
    report = client.get_report(submitted["id"])
    audit, shards = timeline(stack.database_url, submitted["id"])
    assert audit.finished_at is not None
    stored = [s.created_at for s in shards]
    finished = [s.finished_at for s in shards if s.finished_at is not None]
    plan_end, last_shard = min(stored), max(finished)
    per_worker: dict[str, int] = {}
    for s in shards:
        name = (s.worker or "?").split("@")[0]
        per_worker[name] = per_worker.get(name, 0) + 1
    shard_phase = (last_shard - plan_end).total_seconds()
    children = sampler.lifetimes("shards")
    return RunResult(
        workers=k,
        seconds=seconds,
        checks=report["checks"],
        verdict=report["verdict"],
        shards=len(shards),
        plan_seconds=(plan_end - audit.created_at).total_seconds(),
        shard_phase_seconds=shard_phase,
        finalise_seconds=(audit.finished_at - last_shard).total_seconds(),
        per_worker=dict(sorted(per_worker.items())),
        seconds_per_shard=shard_phase * k / max(1, len(shards)),
        shard_children=len(children),
        cpu_per_shard=sum(c[1] for c in children) / max(1, len(shards)),
        other_children=sampler.lifetimes("other"),
        runners_at_once=sampler.max_at_once,
        runner_threads=sorted(sampler.threads),
        cpu_busy=(busy1 - busy0) / max(1.0, total1 - total0),
        runner_cores=sum(c[1] for c in [*children, *sampler.lifetimes("other")]) / seconds,
        load=(load_before, os.getloadavg()[0]),
    )


def import_cost(tries: int) -> tuple[float, float]:
    """(torch, everything a shard child imports) in seconds: the fastest of `tries` fresh
    interpreters, single-threaded, as the runner child starts."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    best = (float("inf"), float("inf"))
    for _ in range(tries):
        out = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        best = min(best, (float(out[0]), float(out[1])), key=lambda t: t[1])
    return best


def print_checks(checks: list[dict[str, Any]]) -> None:
    """One line per check (its scalar fields) and one per level (the headline numbers)."""
    for check in checks:
        scalars = {k: v for k, v in sorted(check.items()) if isinstance(v, str | int | float)}
        print("  " + " ".join(f"{k}={v}" for k, v in scalars.items()))
        for level in check.get("levels") or []:
            line = [f"level={level.get('level')}"]
            for name in ("relative_error", "lipschitz_lower_bound"):
                value = level.get(name)
                if isinstance(value, dict):
                    line += [f"{name}.{k}={v:.6g}" for k, v in sorted(value.items())]
            print("    " + " ".join(line))


def digest(checks: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(checks, sort_keys=True).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated K to run (1 is always run first)"
    )
    parser.add_argument("--images", type=int, default=12, help="images = shards (default 12)")
    parser.add_argument("--steps", type=int, default=20, help="worst_case steps per level")
    parser.add_argument(
        "--levels", default="0.01,0.02,0.05", help="worst_case levels, comma-separated"
    )
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--admin-url", default=PG_ADMIN, help="PostgreSQL admin database")
    parser.add_argument("--redis-db", type=int, default=14, help="flushed before each run")
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: 2 images, 2 steps, one level"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    ks = sorted({int(v) for v in args.workers.split(",") if v.strip()} | {1})
    levels = [float(v) for v in args.levels.split(",") if v.strip()]
    if args.quick:
        args.images, args.steps, levels = 2, 2, [0.05]
    config = audit_config(args.images, args.steps, levels)

    print(
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"database {args.database}, Redis db {args.redis_db}; reference U-Net, worst_case "
        f"{args.steps} steps × {len(levels)} levels × 4 restarts, {args.images} images, "
        "1 image per shard, 1 thread per worker",
        flush=True,
    )
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="tightrope-scale-out-") as tmp:
        root = Path(tmp)
        if not args.quick:
            torch_s, child_s = import_cost(2)
            print(
                f"a shard child's imports (fresh interpreter, 1 thread): torch {torch_s:.1f} s, "
                f"torch + engine {child_s:.1f} s",
                flush=True,
            )
        broker = f"redis://127.0.0.1:6379/{args.redis_db}"
        with contextlib.closing(redis.Redis.from_url(broker)) as r:
            r.flushdb()
        env = {
            "PYTHONPATH": str(REPO),
            "TIGHTROPE_RUNNER_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }
        data_dir = root / "data"
        with database(args.database, data_dir, args.admin_url) as url:
            # the gateway and one `tightrope worker`: K CPU workers and one admission worker
            stack = KWorkerStack(
                data_dir=data_dir, broker_url=broker, database_url=url, extra_env=env
            )
            try:
                print("starting the stack, admitting the reference model…", flush=True)
                stack.start()
                with TightropeClient(stack.api_url, create_key(stack)) as client:
                    model_id = upload_reference(client)
                    for k in ks:
                        result = run_once(k, stack, client, model_id, config)
                        results.append(result)
                        print(
                            f"K={k}: {result.seconds:.1f} s, {result.shards} shards "
                            f"{result.per_worker} run by {result.shard_children} runner "
                            f"processes, verdict {result.verdict}, "
                            f"checks {digest(result.checks)}",
                            flush=True,
                        )
            finally:
                stack.stop()

    base = results[0]
    print("\nchecks of the K=1 report (all fields compared; sha256 of their canonical JSON):")
    print_checks(base.checks)
    same = all(r.checks == base.checks for r in results)
    digests = ", ".join(f"K={r.workers} {digest(r.checks)}" for r in results)
    print(f"checks identical across K: {'yes' if same else 'NO'} ({digests})")
    print(
        f"\n{'K':>2} {'seconds':>8} {'speed-up':>9} {'efficiency':>10} {'goal ≥ 0.8·K':>13} "
        f"{'plan s':>7} {'shards s':>9} {'final s':>8} {'s/shard':>8} {'CPU/shard':>10} "
        f"{'processes':>9} {'at once':>8} {'OMP':>4} {'cores':>6} {'CPU busy':>9} {'load':>9}"
    )
    for r in results:
        speed_up = base.seconds / r.seconds
        goal = GOAL_EFFICIENCY * r.workers
        met = "met" if speed_up >= goal else "MISSED"
        print(
            f"{r.workers:>2} {r.seconds:>8.1f} {speed_up:>9.2f} {speed_up / r.workers:>10.2f} "
            f"{f'{goal:.1f} {met}':>13} {r.plan_seconds:>7.1f} {r.shard_phase_seconds:>9.1f} "
            f"{r.finalise_seconds:>8.1f} {r.seconds_per_shard:>8.1f} {r.cpu_per_shard:>10.1f} "
            f"{r.shard_children:>9} {r.runners_at_once:>8} "
            f"{','.join(r.runner_threads) or '?':>4} {r.runner_cores:>6.2f} {r.cpu_busy:>9.0%} "
            f"{f'{r.load[0]:.1f}/{r.load[1]:.1f}':>9}"
        )
    print(
        "plan s: submit → shards stored (queue wait + plan child); shards s: → last shard "
        "stored; final s: → succeeded (finalising child + report); s/shard: shards s × K / "
        "shards (one worker's time per shard); CPU/shard: CPU seconds of the runner processes "
        "that ran shards / shards; processes: how many there were (one per shard, or one "
        "kept per worker); at once: most runner processes seen at once; OMP: their "
        "OMP_NUM_THREADS; cores: CPU seconds of all the audit's runner children / seconds; "
        "CPU busy: the whole machine (every process) during the audit; load: 1-min load "
        "average before/after"
    )
    for r in results:
        others = ", ".join(f"{wall:.1f} s ({cpu:.1f} s CPU)" for wall, cpu in r.other_children)
        print(f"K={r.workers}: plan and finalising children: {others}")
    for r in results[1:]:
        speed_up = base.seconds / r.seconds
        verdict = "met" if speed_up >= GOAL_EFFICIENCY * r.workers else "MISSED"
        print(
            f"goal ≥ 0.8·K: K={r.workers}: speed-up {speed_up:.2f} against "
            f"{GOAL_EFFICIENCY * r.workers:.1f}: {verdict} (efficiency {speed_up / r.workers:.2f})"
        )
    if args.json:
        args.json.write_text(
            json.dumps([{**r.__dict__, "checks": digest(r.checks)} for r in results], indent=2)
            + "\n"
        )
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
