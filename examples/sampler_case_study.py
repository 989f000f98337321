"""The sampler beside the U-Net (docs/case-study.md, "A sampler beside the U-Net"): the shipped
diffusion sampler (examples/sampler/model.pt, deepinv's DiffPIR with a denoiser trained by
examples/train_sampler.py) audited with the engine, as `tightrope audit` would:

    .venv/bin/python examples/sampler_case_study.py          # under 10 minutes on a 2-core CPU

runs one audit of the sampler and the TV baseline with examples/sampler/case-study.json, then
writes the figures to docs/case-study/sampler-summary.json and prints them: the noise floor, the
hallucination probability (with its Clopper–Pearson interval), the average map's worst-case and
random-noise errors per level, the miss rate, and the clean errors of one draw, of an 8-draw
average, of the TV baseline and of the reference U-Net on the same images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from case_study import (
    audit_in_process,  # examples/case_study.py: run as a script, examples/ is on the path
)

import workers.engine.checks  # noqa: F401 - registers the engine's checks
from schemas.audits import AuditConfig
from schemas.model_spec import ModelSpec
from workers.engine.baselines import build_baseline
from workers.engine.ground_truth import load_images, scale_to_range
from workers.engine.model_loading import load_model
from workers.engine.operators import build_operator

ROOT = Path(__file__).resolve().parent.parent
SAMPLER = ROOT / "examples" / "sampler"
REFERENCE = ROOT / "examples" / "reference"
AVERAGE_DRAWS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=SAMPLER / "case-study.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "case-study")
    parser.add_argument("--work", type=Path, default=ROOT / ".tightrope" / "sampler-case-study")
    parser.add_argument(
        "--reuse", action="store_true", help="summarise the last audit in --work, do not rerun it"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = ModelSpec.model_validate(json.loads((SAMPLER / "spec.json").read_text()))
    config = AuditConfig.model_validate(json.loads(args.config.read_text()))
    report_path = args.work / "report.json"
    if args.reuse and report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        report = audit_in_process(
            SAMPLER / "model.pt", "torchscript", "sampler", spec, config, args.work
        )
    summary = summarise(report, spec, config)
    summary["config"] = str(args.config.resolve().relative_to(ROOT))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampler-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def _check(report: dict[str, Any], kind: str, subject: str) -> dict[str, Any] | None:
    return next(
        (c for c in report["checks"] if c["kind"] == kind and c["subject"] == subject), None
    )


def summarise(report: dict[str, Any], spec: ModelSpec, config: AuditConfig) -> dict[str, Any]:
    model = report["model"]
    summary: dict[str, Any] = {
        "model": model["sha256"],
        "verdict": report["verdict"],
        "audit_wall_seconds": report["cost"]["wall_seconds"],
        "stochastic": model["stochastic"],
        "output_spread": model.get("output_spread"),
        "noise_floor": {
            k: model["noise_floor"][k]
            for k in ("value", "ci_low", "ci_high", "draws_per_input", "inputs")
        },
        "clean_relative_error": clean_errors(spec, config),
    }
    for subject in ("model", "baseline"):
        found: dict[str, Any] = {}
        worst = _check(report, "worst_case", subject)
        if worst is not None:
            found["worst_case"] = {
                "levels": [row["level"] for row in worst["levels"]],
                "mean": [row["relative_error"]["mean"] for row in worst["levels"]],
                "max": [row["relative_error"]["max"] for row in worst["levels"]],
                "standard_error_mean": [
                    (row.get("standard_error") or {}).get("relative_error", {}).get("mean")
                    for row in worst["levels"]
                ],
                "verdict": worst["verdict"],
            }
        noise = _check(report, "random_noise", subject)
        if noise is not None:
            found["random_noise_mean"] = [row["relative_error"]["mean"] for row in noise["levels"]]
        false_positive = _check(report, "false_positive", subject)
        if false_positive is not None:
            found["false_positive"] = {
                "spurious_contrast": false_positive["spurious_contrast"],
                "hallucination": false_positive.get("hallucination"),
                "verdict": false_positive["verdict"],
            }
        false_negative = _check(report, "false_negative", subject)
        if false_negative is not None:
            found["false_negative"] = {
                k: false_negative.get(k) for k in ("miss_rate", "misses", "trials", "verdict")
            }
        summary[subject] = found
    unet = ROOT / "docs" / "case-study" / "summary.json"
    if unet.exists():
        reference = json.loads(unet.read_text())
        summary["unet_case_study"] = {
            "worst_case": reference["worst_case"]["model"],
            "clean_relative_error": reference["clean_relative_error"]["model"],
        }
    return summary


def clean_errors(spec: ModelSpec, config: AuditConfig) -> dict[str, float]:
    """Mean relative error ‖x̂ − x‖/‖x‖ on the audit's images, noiseless measurements: one draw,
    the average of AVERAGE_DRAWS draws, the zero-filled A*y, the TV baseline, the U-Net."""
    assert config.operator is not None
    operator = build_operator(config.operator, spec.image_shape)
    x = scale_to_range(load_images(config.dataset), spec.value_range)
    y = operator.A(x)
    z = operator.A_adjoint(y)
    sampler = load_model(SAMPLER / "model.pt", "torchscript", spec)
    reference_spec = ModelSpec.model_validate(json.loads((REFERENCE / "spec.json").read_text()))
    unet = load_model(REFERENCE / "model.safetensors", "safetensors", reference_spec)

    def error(x_hat: torch.Tensor) -> float:
        return float(((x_hat - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean())

    with torch.no_grad():
        torch.manual_seed(0)
        draws = torch.stack([sampler(z) for _ in range(AVERAGE_DRAWS)])
        out = {
            "sampler_one_draw": error(draws[0]),
            f"sampler_average_{AVERAGE_DRAWS}": error(draws.mean(0)),
            "zero_filled": error(z),
            "unet": error(unet(z)),
        }
        if config.baseline is not None:
            out["tv_baseline"] = error(build_baseline(config.baseline, operator)(y))
    return out


if __name__ == "__main__":
    main()
