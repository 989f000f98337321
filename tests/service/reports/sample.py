"""A hand-made report with known numbers (the shape of docs/reports.md) and tiny artifacts, so
that the renderers are tested without running the engine. Its comparisons and verdicts are the
ones the engine would write (schemas.verdicts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from schemas.canonical import canonical_json
from schemas.verdicts import compare

SIZE = 8


def _level(level: float, error_max: float, ci_high: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "level": level,
        "relative_error": {"mean": error_max / 2, "std": 0.01, "max": error_max},
        "psnr": {"mean": 20.0, "min": 18.0},
        "ssim": {"mean": 0.8, "min": 0.7},
        "amplification": {"mean": 1.5, "max": 2.0},
        "lipschitz_lower_bound": {"mean": 1.2, "max": 1.7},
        "worst_image": {"index": 1, "relative_error": error_max},
    }
    if ci_high is None:  # worst_case
        row.update(
            gaussian_relative_error={"mean": 0.05, "max": 0.06},
            relative_perturbation={"max": level},
            non_finite=0,
            steps={"mean": 5.0, "max": 7.0},
            found_by={"pgd": 2},
        )
        row["worst_image"] = {**row["worst_image"], "optimizer": "pgd", "steps": 7}
    else:
        row.update(
            failure_probability={"estimate": ci_high / 2, "ci_low": 0.0, "ci_high": ci_high},
            failures=2,
            trials=8,
        )
    return row


def _noise(subject: str, ci_high: float, verdict: str) -> dict[str, Any]:
    quantity = "failure probability (upper 95 % bound) at level 0.05"
    return {
        "kind": "random_noise",
        "subject": subject,
        "verdict": verdict,
        "comparisons": [compare(quantity, ci_high, 0.5)],
        "warnings": [],
        "artifacts": [],
        "failure_error": 0.3,
        "samples_per_image": 4,
        "images": 2,
        "clean_relative_error": {"mean": 0.05, "max": 0.06},
        "levels": [_level(0.01, 0.1, ci_high / 2), _level(0.05, 0.2, ci_high)],
        "verdict_level": 0.05,
    }


def make_report(model_name: str = "tiny-net", description: str | None = None) -> dict[str, Any]:
    worst_artifacts = [
        f"c01-model-worst_case-level1-{part}.npy"
        for part in ("original", "clean", "reconstruction", "perturbation")
    ]
    return {
        "schema_version": "1.0",
        "audit_id": None,
        "verdict": "fail",
        "model": {
            "id": None,
            "name": model_name,
            "sha256": "ab" * 32,
            "format": "torchscript",
            "spec": {"name": model_name, "description": description, "image_shape": [1, 8, 8]},
        },
        "config": {
            "checks": [
                {
                    "kind": "random_noise",
                    "levels": [0.01, 0.05],
                    "threshold": {"max_failure_probability": 0.5, "at_level": None},
                },
                {
                    "kind": "worst_case",
                    "levels": [0.01, 0.05],
                    "threshold": {"max_relative_error": 0.4, "at_level": 0.05},
                },
                {"kind": "lipschitz", "threshold": None},
            ],
            "seed": 3,
        },
        "environment": {"python": "3.11", "torch": "2.14.1", "device": "cpu"},
        "seed": 3,
        "cost": {"wall_seconds": 1.5, "forward_passes": 10, "backward_passes": 4},
        "checks": [
            _noise("model", 0.75, "fail"),
            _noise("baseline", 0.25, "pass"),
            {
                "kind": "worst_case",
                "subject": "model",
                "verdict": "fail",
                "comparisons": [compare("worst-case relative error at level 0.05", 0.9, 0.4)],
                "warnings": [],
                "artifacts": worst_artifacts,
                "space": "measurement",
                "target": "ground_truth",
                "formulation": "ball",
                "images": 2,
                "clean_relative_error": {"mean": 0.05, "max": 0.06},
                "levels": [_level(0.01, 0.3), _level(0.05, 0.9)],
            },
            {
                "kind": "lipschitz",
                "subject": "model",
                "verdict": "info",
                "comparisons": [],
                "warnings": [],
                "artifacts": [],
                "jacobian_norm": {"mean": 2.5, "max": 3.25},
                "per_image": [{"index": 0, "jacobian_norm": 3.25, "iterations": 7}],
            },
        ],
        "warnings": [],
    }


def write_report_dir(directory: Path, report: dict[str, Any]) -> Path:
    """report.json plus the worst-case artifacts the report names."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    original = rng.random((1, SIZE, SIZE)).astype(np.float32)
    arrays = {
        "original": original,
        "clean": original + 0.01,
        "reconstruction": original + rng.normal(0, 0.2, original.shape).astype(np.float32),
        "perturbation": rng.normal(0, 0.01, (2, SIZE, SIZE)).astype(np.float32),
    }
    for part, array in arrays.items():
        np.save(directory / f"c01-model-worst_case-level1-{part}.npy", array)
    (directory / "report.json").write_text(canonical_json(report), encoding="utf-8")
    return directory
