"""Where a small audit's time goes on a warm worker, with and without the warm runner.

    .venv/bin/python benchmarks/audit_timeline.py              # 3 audits per mode, SQLite
    .venv/bin/python benchmarks/audit_timeline.py --audits 5 --images 3

For each mode (TIGHTROPE_WARM_RUNNER=0, then 1) it starts a whole local Tightrope (the gateway
and one `tightrope worker` with one CPU worker, the local Redis on its own database, a fresh
SQLite database), uploads the reference U-Net (examples/reference/model.safetensors), runs one
audit to warm the worker up, then `--audits` audits one after the other: a `worst_case` check of
a few steps on `--images` phantoms of the reference case, one shard per image. From the
database's timeline of each audit it takes: submit → first shard running (the audit's
`created_at` to the earliest shard `started_at`: queue wait and the plan step), last shard
stored → `succeeded` (the finalising step), and submit → `succeeded`.

Prints the median of each per mode, the ratio cold/warm, and the goals of issue 20 (submit →
first shard ≤ 1.5 s, last shard → succeeded ≤ 1.5 s, warm). Exit status 0 whether or not a goal
is met (a measurement); 1 when an audit fails. Results: docs/benchmarks.md ("Audit timeline").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from benchmarks.scale_out import (  # noqa: E402
    KWorkerStack,
    audit_config,
    create_key,
    timeline,
    upload_reference,
    use_workers,
)
from workers.cli.client import TightropeClient  # noqa: E402

GOAL_SECONDS = 1.5


@dataclass
class Timeline:
    to_first_shard: float
    finalise: float
    total: float


def one_audit(
    stack: KWorkerStack, client: TightropeClient, model_id: str, config: dict
) -> Timeline:
    submitted = client.submit_audit({**config, "model_id": model_id})
    final = client.wait_audit(submitted["id"], timeout=900, poll=0.1)
    if final["status"] != "succeeded":
        raise SystemExit(f"the audit ended {final['status']}: {final}")
    assert stack.database_url is not None
    audit, shards = timeline(stack.database_url, submitted["id"])
    assert audit.finished_at is not None
    started = min(s.started_at for s in shards if s.started_at is not None)
    last = max(s.finished_at for s in shards if s.finished_at is not None)
    return Timeline(
        to_first_shard=(started - audit.created_at).total_seconds(),
        finalise=(audit.finished_at - last).total_seconds(),
        total=(audit.finished_at - audit.created_at).total_seconds(),
    )


def run_mode(warm: bool, args: argparse.Namespace, root: Path) -> list[Timeline]:
    broker = f"redis://127.0.0.1:6379/{args.redis_db}"
    with contextlib.closing(redis.Redis.from_url(broker)) as r:
        r.flushdb()
    data_dir = root / ("warm" if warm else "cold")
    env = {"PYTHONPATH": str(REPO), "TIGHTROPE_WARM_RUNNER": "1" if warm else "0"}
    stack = KWorkerStack(
        data_dir=data_dir,
        broker_url=broker,
        database_url=f"sqlite:///{data_dir / 'tightrope.db'}",
        extra_env=env,
    )
    config = audit_config(args.images, args.steps, [0.05])
    try:
        stack.start()
        with TightropeClient(stack.api_url, create_key(stack)) as client:
            model_id = upload_reference(client)
            use_workers(stack, 1)
            one_audit(stack, client, model_id, config)  # the worker's first audit: warms it
            found = []
            for _ in range(args.audits):
                time.sleep(args.pause)  # a worker between audits, as in use
                found.append(one_audit(stack, client, model_id, config))
            return found
    finally:
        stack.stop()
        if args.logs is not None:  # the gateway's and the worker's logs, for a closer look
            target = args.logs / data_dir.name
            shutil.copytree(stack.log_dir, target, dirs_exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audits", type=int, default=3, help="audits timed per mode")
    parser.add_argument("--images", type=int, default=2, help="images = shards")
    parser.add_argument("--steps", type=int, default=4, help="worst_case steps")
    parser.add_argument("--pause", type=float, default=8.0, help="seconds between audits")
    parser.add_argument("--redis-db", type=int, default=14, help="flushed before each mode")
    parser.add_argument("--logs", type=Path, help="copy the stacks' logs here")
    parser.add_argument("--modes", default="cold,warm", help="which modes to run")
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"{args.audits} audits per mode, {args.images} shards each, {args.pause:g} s apart",
        flush=True,
    )
    medians: dict[bool, Timeline] = {}
    with tempfile.TemporaryDirectory(prefix="tightrope-timeline-") as tmp:
        for warm in [mode == "warm" for mode in args.modes.split(",")]:
            found = run_mode(warm, args, Path(tmp))
            medians[warm] = Timeline(
                statistics.median(t.to_first_shard for t in found),
                statistics.median(t.finalise for t in found),
                statistics.median(t.total for t in found),
            )
            name = "warm runner" if warm else "cold runners"
            for t in found:
                print(
                    f"{name}: submit → first shard {t.to_first_shard:.2f} s, last shard → "
                    f"succeeded {t.finalise:.2f} s, total {t.total:.2f} s",
                    flush=True,
                )
    if len(medians) < 2:
        return
    cold, warm = medians[False], medians[True]
    print(f"\n{'median':<28} {'cold':>7} {'warm':>7} {'cold/warm':>10} {'goal (warm)':>12}")
    for label, a, b, goal in (
        ("submit → first shard s", cold.to_first_shard, warm.to_first_shard, GOAL_SECONDS),
        ("last shard → succeeded s", cold.finalise, warm.finalise, GOAL_SECONDS),
        ("submit → succeeded s", cold.total, warm.total, None),
    ):
        verdict = "" if goal is None else ("met" if b <= goal else "MISSED")
        goal_text = "" if goal is None else f"≤ {goal:g} {verdict}"
        print(f"{label:<28} {a:>7.2f} {b:>7.2f} {a / b:>10.2f} {goal_text:>12}")


if __name__ == "__main__":
    main()
