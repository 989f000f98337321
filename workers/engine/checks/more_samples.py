"""`more_samples`: reconstruction quality as the sampling grows (Invfool's test 3). A stable
method improves, or at least does not degrade, with more measurements; a network trained on one
sampling pattern may get worse.

Each level rebuilds the audit's operator with one sampling parameter changed (MRI
`acceleration`, CT `angles`; every other field, seeds included, as configured), rebuilds the
subject for it (the model under its input convention, or the baseline), and reconstructs the
audit's images from y = A'x + e (the audit's relative noise, seeded per image). A level the
model cannot take (a `measurement` model whose input shape changes, or any error the model
raises on the new measurements) is skipped with a warning; the check goes on with the others."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch

from schemas.checks_theorem import MoreSamplesCheck, sampling_operator_problem
from schemas.verdicts import compare, judge
from workers.engine import metrics
from workers.engine.checks.theorem_common import is_complex
from workers.engine.context import AuditContext, Subject
from workers.engine.operators import build_operator
from workers.shared.errors import EngineInputError

METRICS = ("psnr", "ssim", "relative_error")


def sampling_levels(config: MoreSamplesCheck, operator_kind: str) -> tuple[str, list[float]]:
    """(the operator field that changes, its values in the order samples rise)."""
    problem = sampling_operator_problem(config, operator_kind)
    if problem is not None:
        raise EngineInputError(problem)
    if config.accelerations is not None:
        return "acceleration", list(config.accelerations)
    assert config.angles is not None  # the schema asks for exactly one list
    return "angles", [float(a) for a in config.angles]


class MoreSamples:
    kind = "more_samples"

    def run(
        self,
        config: MoreSamplesCheck,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]:
        if ctx.operator_config is None or ctx.subject_for is None:
            raise EngineInputError("more_samples needs an audit that can rebuild its operator")
        field, values = sampling_levels(config, ctx.operator_config.kind)
        x = ctx.images[list(indices)]
        image_shape = ctx.operator.image_shape
        complex_image = is_complex(ctx)
        levels = []
        for value in values:
            setting = int(value) if field == "angles" else value
            level: dict[str, Any] = {"value": setting}
            operator_config = ctx.operator_config.model_copy(update={field: setting})
            operator = build_operator(operator_config, image_shape, ctx.device, ctx.base_dir)
            try:
                rebuilt = ctx.subject_for(subject.name, operator)
                y = dataclasses.replace(ctx, operator=operator).measurements(indices)
                with torch.no_grad():
                    out = rebuilt.reconstruct(y)
            except (EngineInputError, RuntimeError) as error:
                level["skipped"] = _first_line(error)
                levels.append(level)
                continue
            with torch.no_grad():
                level["values"] = {
                    "psnr": metrics.psnr(out, x, ctx.value_range, complex_image),
                    "ssim": metrics.ssim(out, x, ctx.value_range, complex_image),
                    "relative_error": metrics.relative_error(out, x),
                }
            level["values"] = {
                name: tensor.double().cpu().tolist() for name, tensor in level["values"].items()
            }
            levels.append(level)
        return {"field": field, "indices": [int(i) for i in indices], "levels": levels}

    def merge(self, config: MoreSamplesCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
        field = shards[0]["field"]
        warnings: list[str] = []
        table = []
        for k, first in enumerate(shards[0]["levels"]):
            parts = [shard["levels"][k] for shard in shards]
            skipped = next((p["skipped"] for p in parts if "skipped" in p), None)
            row: dict[str, Any] = {field: first["value"]}
            if skipped is not None:
                row["skipped"] = skipped
                warnings.append(f"{field} {first['value']}: skipped ({skipped})")
            else:
                for name in METRICS:
                    values = [v for p in parts for v in p["values"][name] if math.isfinite(v)]
                    row[name] = _summary(name, values)
            table.append(row)
        ran = [row for row in table if "skipped" not in row]
        falls = [
            {
                "from": a[field],
                "to": b[field],
                "psnr_drop": a["psnr"]["mean"] - b["psnr"]["mean"],
            }
            for a, b in pairwise(ran)
            if a["psnr"]["mean"] is not None
            and b["psnr"]["mean"] is not None
            and b["psnr"]["mean"] < a["psnr"]["mean"] - config.tolerance
        ]
        monotone: bool | None = None if len(ran) < 2 else not falls
        if monotone is None:
            warnings.append("fewer than two sampling levels ran: monotonicity is unknown")
        for fall in falls:
            warnings.append(
                f"quality falls while samples rise: mean PSNR drops {fall['psnr_drop']:.2f} dB "
                f"from {field} {fall['from']} to {fall['to']}"
            )
        result: dict[str, Any] = {
            "parameter": field,
            "images": sum(len(shard["indices"]) for shard in shards),
            "levels": table,
            "monotone": monotone,
            "falls": falls,
        }
        comparisons = []
        if config.threshold is not None:
            # fewer than two levels ran: monotonicity was not measured, so it cannot pass
            worst = None if monotone is None else max((f["psnr_drop"] for f in falls), default=0.0)
            comparisons.append(
                compare("largest PSNR fall (dB)", worst, config.threshold.max_psnr_drop)
            )
        judge(result, comparisons)
        result["warnings"] = warnings
        return result


def _summary(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "min" if name != "relative_error" else "max": None}
    mean = math.fsum(values) / len(values)
    if name == "relative_error":
        return {"mean": mean, "max": max(values)}
    return {"mean": mean, "min": min(values)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
