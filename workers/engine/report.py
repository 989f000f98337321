"""Assembling and writing the audit report (docs/reports.md lists every field)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import deepinv
import numpy as np
import torch

from schemas.audits import AuditConfig, strip_unset_regressions
from schemas.canonical import canonical_json  # the serialisation reports are signed in
from schemas.reports import SCHEMA_VERSION, Report
from schemas.verdicts import report_verdict
from workers.engine.shards import check_seed

REPORT_FILE = "report.json"


def canonical_config(config: AuditConfig) -> dict[str, Any]:
    """The config as run: defaults filled in, aliases (`lambda`), every check's seed a number."""
    data = config.model_dump(mode="json", by_alias=True)
    for check, dumped in zip(config.checks, data["checks"], strict=True):
        dumped["seed"] = check_seed(config.seed, check.seed)
    return strip_unset_regressions(data)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepinv": deepinv.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Validate against schemas.reports.Report, then write report.json in canonical JSON."""
    Report.model_validate(report)
    path = out_dir / REPORT_FILE
    path.write_text(canonical_json(report), encoding="utf-8")
    return path


def build_report(
    *,
    audit_id: str | None,
    model: dict[str, Any],
    config: AuditConfig,
    device: torch.device,
    checks: list[dict[str, Any]],
    cost: dict[str, Any],
    warnings: list[str],
    comparison: dict[str, Any] | None = None,
) -> dict[str, Any]:
    report = {
        "schema_version": SCHEMA_VERSION,
        "audit_id": audit_id,
        "model": model,
        "config": canonical_config(config),
        "environment": environment(device),
        "seed": config.seed,
        "verdict": report_verdict(checks, comparison, model.get("comparisons")),
        "cost": cost,
        "checks": checks,
        "warnings": warnings,
    }
    if comparison is not None:  # only with compare_with: other reports keep their bytes
        report["comparison"] = comparison
    return report
