"""A fake runner that behaves like a quick successful audit: progress, one shard per check
(skipping the shards already in shards/), then out/report.json. Writes `attempt-resumed.txt`
(the shard ids it found) so a test can see a retry resume."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def main(job_dir: Path) -> int:
    job = json.loads((job_dir / "job.json").read_text())
    done = sorted(p.stem for p in (job_dir / "shards").glob("*.json"))
    (job_dir / "out").mkdir(exist_ok=True)
    for index, check in enumerate(job["config"]["checks"]):
        shard_id = f"{check['kind']}-{index}"
        emit(event="progress", fraction=index / len(job["config"]["checks"]), check=check["kind"])
        if shard_id not in done:
            (job_dir / "shards" / f"{shard_id}.json").write_text(json.dumps({"value": index}))
            emit(event="shard", shard_id=shard_id, file=f"shards/{shard_id}.json")
        time.sleep(0.05)
    report = {"verdict": "pass", "resumed_shards": done, "audit_id": job["audit_id"]}
    (job_dir / "out" / "report.json").write_text(json.dumps(report))
    (job_dir / "out" / "figure.png").write_bytes(b"\x89PNG fake")
    emit(event="report", file="out/report.json", info={"verdict": "pass"})
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
