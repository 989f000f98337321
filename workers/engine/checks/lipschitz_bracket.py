"""lipschitz's `certify`: a certified upper bound beside every measured Jacobian norm, so each
image's local Lipschitz constant over a ball is bracketed and a threshold can be proven
(docs/theorem.md, "Brackets").

In each shard, after the Lanczos iteration, for every image: U ≥ sup ‖J_Ψ(y + K e) K‖₂ over
‖e‖₂ ≤ ε, ε = radius·‖y‖ over the measured entries, through the same map K from the measurement
perturbation to the network's input that worst_case's bracket uses (the measured entries for a
network that reads y, A*·P for one that reads A* y: `bracket.InputMaps`), from
`workers.engine.bounds.certify_lipschitz` on the network's float64 copy. The norm the check
measured at y, a point of the ball, is the bracket's lower end. `merge_lipschitz_bracket` turns
the shards' records into the report's `certified` bracket, the `certify` section (its `proof`)
and the certified comparison, as `bracket.merge_bracket` does for worst_case's levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

from schemas.checks import LipschitzCheck
from schemas.verdicts import compare
from workers.engine.bounds import Unbounded, certify_lipschitz
from workers.engine.checks.bracket import (
    ALLOWANCE,
    MEMORY_MEASURES,
    InputMaps,
    NoBound,
    decide_proof,
    guarded,
    ratio,
    unbounded_subject,
    within,
)
from workers.engine.context import AuditContext, Subject

# The interval Jacobian holds one copy of every activation per perturbation entry (its columns):
# measurements of at most this many entries (32×32 for one channel) are bounded, larger ones are
# `unavailable` with the reason.
MAX_PERTURBATION_ENTRIES = 1024
QUANTITY = (
    "the largest Jacobian spectral norm over the ball ‖e‖ ≤ ε around each measurement "
    "(ε = radius·‖y‖ over the measured entries), a Lipschitz constant of Ψ on the ball: `found` "
    "is the norm the check measured at y, a lower bound; `upper` is U, a certified upper bound "
    "for the network's float64 copy"
)
CERTIFIED_QUANTITY = "certified upper bound of the Jacobian spectral norm over the ball, largest"


def certify_lipschitz_shard(
    config: LipschitzCheck,
    ctx: AuditContext,
    subject: Subject,
    indices: Sequence[int],
    per_image: list[dict[str, Any]],
) -> dict[str, Any]:
    """Bound every image of the shard (`per_image`, the check's rows in `indices` order). Returns
    the shard's `certify` record: the device, how memory was measured, `reason` (why no bound,
    e.g. the unsupported layer) or null, and `images` (per image: found, upper, cost)."""
    assert config.certify is not None
    device = ctx.device
    record: dict[str, Any] = {
        "device": device.type,
        "memory_measure": MEMORY_MEASURES["cuda" if device.type == "cuda" else "cpu"],
        "reason": unbounded_subject(subject),
        "images": [],
    }
    if record["reason"] is not None or not per_image:
        return record
    entries = math.prod(ctx.operator.measurement_shape)
    if entries > MAX_PERTURBATION_ENTRIES:
        record["reason"] = (
            f"the measurement has {entries} entries; the interval Jacobian holds a copy of every "
            f"activation per entry, so at most {MAX_PERTURBATION_ENTRIES} are bounded"
        )
        return record
    try:
        maps = InputMaps(ctx, str(subject.network_input), "measurement")
    except NoBound as exc:
        record["reason"] = exc.reason
        return record
    y = ctx.measurements(indices).detach().double()
    intermediate = config.certify.intermediate
    for position, row in enumerate(per_image):
        if ctx.should_stop():
            record["images"] = []
            record["reason"] = "stopped before every image was bounded"
            return record
        y_i = y[position : position + 1]
        radius = config.certify.radius * float(ctx.operator.norm(y_i)[0])
        inputs = maps.input_set(y_i, radius)
        bound = partial(certify_lipschitz, subject.network, inputs, intermediate=intermediate)
        certificate, cost = guarded(device, bound)
        if isinstance(certificate, Unbounded):  # the same network everywhere: no bound for any
            record["images"] = []
            record["reason"] = certificate.reason
            return record
        upper = certificate.upper
        record["images"].append(
            {
                "index": int(row["index"]),
                "found": row["jacobian_norm"],
                "upper": upper if math.isfinite(upper) else None,
                "ratio": ratio(upper if math.isfinite(upper) else None, row["jacobian_norm"]),
                "radius": radius,
                "method": certificate.method,
                "seconds": cost["seconds"],
                "peak_memory_bytes": cost["peak_memory_bytes"],
            }
        )
    return record


def merge_lipschitz_bracket(
    config: LipschitzCheck,
    shards: list[dict[str, Any]],
    found_comparisons: list[dict[str, Any]],
    warnings: list[str],
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The check's `certify` section, its `certified` bracket and the certified comparisons (to
    follow the found ones). The section's `proof` decides `proven`."""
    assert config.certify is not None
    records = [s["certify"] for s in shards if isinstance(s.get("certify"), dict)]
    reason = next((r["reason"] for r in records if r.get("reason")), None)
    if reason is None and len(records) < len(shards):
        reason = "a shard returned no bound"
    per_image = [] if reason is not None else [i for r in records for i in r["images"]]
    uppers = [i["upper"] for i in per_image]
    founds = [i["found"] for i in per_image if i["found"] is not None]
    upper = max(uppers) if per_image and None not in uppers else None
    found = max(founds) if founds else None
    threshold = config.threshold
    comparisons = []
    if threshold is not None and reason is None:
        comparisons.append(
            compare(
                CERTIFIED_QUANTITY,
                None if upper is None else upper * (1 + ALLOWANCE),
                threshold.max_jacobian_norm,
            )
        )
    policy = config.certify.unproven
    proof, kept = decide_proof(
        threshold is not None,
        reason,
        found_comparisons,
        comparisons,
        policy,
        warnings,
        "measured norms'",
    )
    seconds = round(math.fsum(i["seconds"] for i in per_image), 6)
    peak = max((i["peak_memory_bytes"] for i in per_image), default=0)
    bracket = {
        "found": found,
        "upper": upper,
        "ratio": ratio(upper, found),
        "proven": None if threshold is None else within(upper, threshold.max_jacobian_norm),
        "seconds": seconds,
        "peak_memory_bytes": peak,
        "images": per_image,
    }
    section = {
        "intermediate": config.certify.intermediate,
        "unproven": policy,
        "radius": config.certify.radius,
        "quantity": QUANTITY,
        "allowance": ALLOWANCE,
        "reason": reason,
        "proof": proof,
        "device": records[0]["device"] if records else None,
        "seconds": seconds,
        "peak_memory_bytes": peak,
        "memory_measure": records[0]["memory_measure"] if records else None,
    }
    return section, bracket, kept
