"""Idle OpenMP threads: spinning (the default) against sleeping (OMP_WAIT_POLICY=PASSIVE), for a
runner beside other work on the same cores.

    .venv/bin/python benchmarks/omp_wait_policy.py            # 40 calls per case
    .venv/bin/python benchmarks/omp_wait_policy.py --calls 100 --threads 2

Times calls of the reference U-Net (examples/reference/model.safetensors, 2 inputs of 64×64)
in a fresh process with `--threads` OpenMP threads, as a runner child makes them, under each
wait policy, twice: alone, and beside a competing process that keeps the same number of threads
busy with the same calls (what a second worker's runner, or the test suite, does on a 2-core
machine). Prints the median seconds per call of each case and the ratios. Exit status 0 (a
measurement). Results: docs/benchmarks.md ("Idle OpenMP threads").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CALLS = """
import json, sys, time
sys.path.insert(0, {repo!r})
import torch
from schemas.model_spec import ModelSpec
from workers.engine.model_loading import load_model
reference = {reference!r}
spec = ModelSpec.model_validate(json.loads(open(reference + "/spec.json").read()))
model = load_model(reference + "/model.safetensors", "safetensors", spec)
x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
seconds = []
with torch.no_grad():
    for _ in range(3):
        model(x)
    for _ in range({calls}):
        started = time.perf_counter()
        model(x)
        seconds.append(time.perf_counter() - started)
print(json.dumps(seconds))
"""

COMPETITOR = """
import sys
sys.path.insert(0, {repo!r})
import torch
x = torch.rand(8, 64, 64, 64)
w = torch.rand(64, 64, 3, 3)
while True:
    torch.nn.functional.conv2d(x, w, padding=1)
"""


def timed_calls(policy: str, threads: int, calls: int, contended: bool) -> float:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": policy,
    }
    competitor = None
    if contended:
        competitor = subprocess.Popen(
            [sys.executable, "-c", COMPETITOR.format(repo=str(REPO))],
            env={**env, "OMP_WAIT_POLICY": policy},
        )
        time.sleep(3.0)  # its imports done, its threads busy
    try:
        code = CALLS.format(
            repo=str(REPO), reference=str(REPO / "examples" / "reference"), calls=calls
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return statistics.median(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads of each process")
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"{args.threads} threads per process, {args.calls} calls per case",
        flush=True,
    )
    found: dict[tuple[str, bool], float] = {}
    for contended in (False, True):
        for policy in ("ACTIVE", "PASSIVE"):
            found[(policy, contended)] = timed_calls(policy, args.threads, args.calls, contended)
            where = "beside a busy process" if contended else "alone"
            print(
                f"OMP_WAIT_POLICY={policy:<8} {where:<22} "
                f"{found[(policy, contended)] * 1000:8.1f} ms per call",
                flush=True,
            )
    for contended in (False, True):
        where = "beside a busy process" if contended else "alone"
        ratio = found[("ACTIVE", contended)] / found[("PASSIVE", contended)]
        print(f"spinning / sleeping, {where}: {ratio:.2f}")


if __name__ == "__main__":
    main()
