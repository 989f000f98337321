"""A fake runner whose shards end as the audit's seed says: 0 succeeds (as the `report` fake),
1 fails with the engine's error event, 2 never returns (the audit's time limit ends it). Plans
and finalising steps are the `report` fake's. Serves (`--serve`) like the real runner."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.workers.fakes.report import emit, main, run_shards


def run(job_dir: Path, job: dict) -> None:
    seed = job["config"]["seed"]
    if seed == 1:
        emit(
            event="error",
            message="Invalid audit input",
            reason="EngineInputError: this audit fails on purpose",
            info={"status": 422, "cause": "input"},
        )
        sys.exit(1)
    if seed == 2:
        while True:
            time.sleep(60)
    run_shards(job_dir, job)


if __name__ == "__main__":
    job_dir = Path(sys.argv[1])
    job = json.loads((job_dir / "job.json").read_text())
    if job["kind"] != "shards":
        sys.exit(main(job_dir))
    run(job_dir, job)
    while "--serve" in sys.argv and sys.stdin.readline():
        run(job_dir, json.loads((job_dir / "job.json").read_text()))
