"""A fake runner that behaves like a quick successful audit: one shard per check, `<kind>-<i>`.
`plan` writes out/plan.json; `shards` writes each named shard; `audit` runs the shards not in
shards/ yet and writes out/report.json, whose `resumed_shards` names the shards it was given."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def plan(job_dir: Path, job: dict) -> int:
    shards = [
        {
            "shard_id": f"{c['kind']}-{i}",
            "check_index": i,
            "kind": c["kind"],
            "subject": "model",
            "start": 0,
            "stop": 1,
        }
        for i, c in enumerate(job["config"]["checks"])
    ]
    (job_dir / "out").mkdir(exist_ok=True)
    (job_dir / "out" / "plan.json").write_text(json.dumps({"shards": shards}))
    emit(event="plan", file="out/plan.json", info={"shards": len(shards)})
    return 0


def run_shards(job_dir: Path, job: dict) -> int:
    for shard_id in job["shard_ids"]:
        index = int(shard_id.rsplit("-", 1)[1])
        (job_dir / "shards" / f"{shard_id}.json").write_text(json.dumps({"value": index}))
        emit(event="shard", shard_id=shard_id, file=f"shards/{shard_id}.json")
    emit(event="done")
    return 0


def main(job_dir: Path) -> int:
    job = json.loads((job_dir / "job.json").read_text())
    if job["kind"] == "plan":
        return plan(job_dir, job)
    if job["kind"] == "shards":
        run_shards(job_dir, job)
        # --serve: run the shards job.json names again each time the worker says "next"
        while "--serve" in sys.argv and sys.stdin.readline():
            run_shards(job_dir, json.loads((job_dir / "job.json").read_text()))
        return 0
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
