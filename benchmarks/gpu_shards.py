"""The distributed audit path on a GPU: plan, run every shard alone, merge; against one run.

    .venv/bin/python benchmarks/gpu_shards.py [--device cuda] [--images 4]

What each worker of a distributed audit does, on one machine and in process (no broker, no
sandbox): the reference U-Net of examples/reference audited with its audit.json (random noise,
worst case, Jacobian norm) and `images_per_shard` 1, with device `cuda`:

1. the whole audit in one run (what one worker would produce),
2. the plan (workers.engine.audit.plan_audit), then each shard alone in reverse order (as other
   workers would, in any order), each result through JSON as the database stores it, then the
   merge of the stored results (the finalising task).

Prints whether the two reports' checks are identical (deterministic algorithms are on, so on
one GPU they should be), the per-shard seconds on the device and, for the first shard, on the
CPU; the ratio CPU/GPU for that shard. Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch

from schemas.audits import AuditConfig
from schemas.model_spec import ModelSpec
from workers.engine.audit import plan_audit, run_audit_with_model
from workers.engine.model_loading import load_model
from workers.engine.report import canonical_json

REFERENCE = Path(__file__).resolve().parents[1] / "examples" / "reference"


def _config(device: str, images: int) -> AuditConfig:
    raw = json.loads((REFERENCE / "audit.json").read_text())
    raw["dataset"]["count"] = images
    raw["device"] = device
    raw["budget"] = {"images_per_shard": 1}
    return AuditConfig.model_validate(raw)


def _run(model: torch.nn.Module, spec: ModelSpec, config: AuditConfig, out: Path, **kw: Any):
    return run_audit_with_model(
        model, spec, config, out_dir=out, model_sha256="0" * 64, model_name=spec.name, **kw
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    spec = ModelSpec.model_validate_json((REFERENCE / "spec.json").read_text())
    config = _config(args.device, args.images)
    model = load_model(REFERENCE / "model.pt", "torchscript", spec, args.device)
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")

    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        whole = _run(model, spec, config, root / "whole")
        whole_seconds = time.perf_counter() - started

        plan = plan_audit(spec, config, None)
        stored: dict[str, dict[str, Any]] = {}
        shard_seconds: dict[str, float] = {}
        for shard in reversed(plan):
            started = time.perf_counter()
            _run(
                model,
                spec,
                config,
                root / shard.shard_id,
                only_shards=[shard.shard_id],
                on_shard=lambda sid, rec: stored.update({sid: json.loads(json.dumps(rec))}),
            )
            shard_seconds[shard.shard_id] = time.perf_counter() - started
        merged = _run(model, spec, config, root / "merged", completed_shards=stored)

    same = canonical_json(whole["checks"]) == canonical_json(merged["checks"])
    print(f"shards: {len(plan)}; one run {whole_seconds:.1f} s on {args.device}")
    for shard_id, seconds in sorted(shard_seconds.items()):
        print(f"  {shard_id}: {seconds:.2f} s")
    print(f"checks of the merged shards identical to the one run: {same}")

    first = plan[0].shard_id
    if args.device == "cuda":
        cpu_config = _config("cpu", args.images)
        cpu_model = load_model(REFERENCE / "model.pt", "torchscript", spec, "cpu")
        with TemporaryDirectory() as tmp:
            started = time.perf_counter()
            _run(cpu_model, spec, cpu_config, Path(tmp), only_shards=[first])
            cpu_seconds = time.perf_counter() - started
        gpu_seconds = shard_seconds[first]
        print(
            f"shard {first}: cpu {cpu_seconds:.2f} s ({torch.get_num_threads()} threads), "
            f"gpu {gpu_seconds:.2f} s, ratio cpu/gpu {cpu_seconds / gpu_seconds:.1f}"
        )
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
