"""worst_case's `certify`: a certified upper bound beside every found value, so each level's
worst case is bracketed and a threshold can be proven (docs/theorem.md, "Brackets").

In each shard, after the search, for every image and level: U ≥ sup ‖Ψ(y + e) − Ψ(y)‖ over the
level's ball (the same space, ℓ2 norm and radius ε the search used, through the same map K from
the perturbation to the model's input: the measured entries for a model that reads y, A*·P for
one that reads A* y, and A, or A*A, for image-space perturbations), from
`workers.engine.bounds.certify_output_change` on the network's float64 copy. Each level row of
the shard's images gains `certified`: the worst change per unit radius found (the search's
change over ε) and certified (U/ε), the certified relative error (‖Ψ(y) − x‖ + U)/‖x‖, and the
time and peak memory the bound took. `merge_bracket` turns them into the report's per-level
brackets, the `certify` section (its `proof`) and the certified comparisons.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from schemas.checks import WorstCaseCheck
from schemas.verdicts import compare, fmt
from workers.engine.bounds import (
    Certificate,
    InputSet,
    LinearMap,
    Unbounded,
    certify_output_change,
    through_linear_map,
)
from workers.engine.context import AuditContext, Subject
from workers.shared.errors import is_out_of_memory

# A found value comes from the float32 model, U from its float64 copy: a threshold counts as
# proven when U·(1 + ALLOWANCE) is at most the bound (docs/theorem.md, "Brackets").
ALLOWANCE = 1e-6
# K is held densely where it is not a 0/1 diagonal: up to this many entries (float64)
MAX_DENSE_ENTRIES = 2**26
MEMORY_MEASURES = {
    "cuda": "peak of torch's allocated GPU memory during the bound above what was allocated "
    "when it started (torch.cuda.max_memory_allocated, its peak reset before each bound)",
    "cpu": "rise of the process's peak resident set size during the bound (getrusage "
    "ru_maxrss): 0 when the bound stayed below an earlier peak, so a lower bound on its use",
}
QUANTITY = (
    "the worst change per unit radius over the level's ball, sup ‖Ψ(y+e) − Ψ(y)‖/ε for ‖e‖ ≤ ε "
    "(ε = δ‖y‖ over the measured entries, or δ‖x‖ for image-space perturbations): `found` is "
    "the search's perturbation's change over ε, a lower bound; `upper` is U/ε, U a certified "
    "upper bound for the network's float64 copy"
)


def certify_shard(
    config: WorstCaseCheck,
    ctx: AuditContext,
    subject: Subject,
    indices: Sequence[int],
    images: list[dict[str, Any]],
) -> dict[str, Any]:
    """Bound every image and level of the shard's `images` (the search's rows, in `indices`
    order): each level row gains `certified`. Returns the shard's `certify` record: the device,
    how memory was measured, and `reason` (why no bound, e.g. the unsupported layer) or null."""
    assert config.certify is not None
    device = ctx.device
    record: dict[str, Any] = {
        "device": device.type,
        "memory_measure": MEMORY_MEASURES["cuda" if device.type == "cuda" else "cpu"],
        "reason": unbounded_subject(subject),
    }
    if record["reason"] is not None or not images:
        return record
    y = ctx.measurements(indices).detach()
    x = ctx.images[list(indices)].detach()
    try:
        maps = InputMaps(ctx, str(subject.network_input), config.space)
    except NoBound as exc:
        record["reason"] = exc.reason
        return record
    intermediate = config.certify.intermediate
    rows_done: list[dict[str, Any]] = []
    for position, image in enumerate(images):
        y_i = y[position : position + 1].to(torch.float64)
        x_i = x[position : position + 1].to(torch.float64)
        x_norm = float(torch.linalg.vector_norm(x_i))
        y_norm = float(torch.linalg.vector_norm(ctx.operator.project(y_i)))
        scale = x_norm if config.space == "image" else y_norm
        for row in image["levels"]:
            if ctx.should_stop():
                return record
            radius = float(row["level"]) * scale
            inputs = maps.input_set(y_i, radius)
            bound = partial(
                certify_output_change,
                subject.network,
                inputs,
                methods=("ibp", "crown"),
                intermediate=intermediate,
            )
            certificate, cost = guarded(device, bound)
            if isinstance(certificate, Unbounded):
                for done in rows_done:  # the same network everywhere: no bound for any
                    done.pop("certified", None)
                record["reason"] = certificate.reason
                return record
            clean = image.get("clean_relative_error")
            row["certified"] = _row(row, certificate, radius, y_norm, x_norm, clean, cost)
            rows_done.append(row)
    return record


def guarded(
    device: torch.device, bound: Callable[[], Certificate | Unbounded]
) -> tuple[Certificate | Unbounded, dict[str, Any]]:
    """The bound's certificate (or an `Unbounded` saying how it failed: out of memory, an
    error) and its cost (`measured`): a failed bound leaves the found values standing."""
    try:
        with measured(device) as cost:
            certificate = bound()
    except Exception as exc:  # noqa: BLE001 - the found values stand without U
        if is_out_of_memory(exc) and device.type == "cuda":
            torch.cuda.empty_cache()
        what = "ran out of memory" if is_out_of_memory(exc) else "failed"
        certificate = Unbounded(
            f"the bound {what} on the {device.type} ({type(exc).__name__}: {str(exc)[:200]})"
        )
    return certificate, cost


def unbounded_subject(subject: Subject) -> str | None:
    if subject.stochastic:
        return (
            "the model is stochastic: its average map is no network the bound can trace, and "
            "a bound on one draw's network is no bound on the sampler"
        )
    if subject.network is None or subject.network_input is None:
        if subject.name == "baseline":
            return "the baseline is an iterative solver, not a network the bound can trace"
        return "the subject is not a torch module the bound can trace (no network in memory)"
    return None


def _row(
    row: dict[str, Any],
    certificate: Certificate,
    radius: float,
    y_norm: float,
    x_norm: float,
    clean: float | None,
    cost: dict[str, Any],
) -> dict[str, Any]:
    """One image's bracket at one level: found and certified change per unit radius."""
    # the search's change ‖Ψ(y+e) − Ψ(y)‖ = ratio · ‖e‖, ‖e‖ = relative_perturbation · ‖y‖
    change = row["lipschitz_lower_bound"] * row["relative_perturbation"] * y_norm
    found = change / radius if radius > 0 and math.isfinite(change) else None
    upper = certificate.upper / radius if radius > 0 else None
    return {
        "found": found,
        "upper": upper if upper is not None and math.isfinite(upper) else None,
        "radius": radius,
        "upper_change": certificate.upper if math.isfinite(certificate.upper) else None,
        "x_norm": x_norm,
        "method": certificate.method,
        "clean_relative_error": clean,
        "seconds": cost["seconds"],
        "peak_memory_bytes": cost["peak_memory_bytes"],
    }


class NoBound(Exception):  # noqa: N818 - a reason the report shows
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InputMaps:
    """The map K from the search's perturbation to the network's input, and the input at
    e = 0, as the subject and the search build them (workers.engine.subjects,
    workers.engine.attacks): measurement space e = P e (P the measured entries), image space
    e = A r; the network reads y + e, or A*(y + e) for input `adjoint`."""

    def __init__(self, ctx: AuditContext, network_input: str, space: str) -> None:
        self.operator = ctx.operator
        self.device = ctx.device
        self.adjoint = network_input == "adjoint"
        self.space = space
        measurement_shape = tuple(self.operator.measurement_shape)
        image_shape = tuple(self.operator.image_shape)
        try:
            ones = torch.ones(1, *measurement_shape, dtype=torch.float64, device=self.device)
            self.mask = self.operator.project(ones).reshape(-1).to(torch.float64)
            # the network's input from y (for `adjoint`: A*·P, its matrix)
            self.reader: LinearMap | None = None
            if self.adjoint:
                self.reader = self._dense(
                    lambda e: self.operator.A_adjoint(self.operator.project(e)),
                    measurement_shape,
                )
            # K for image-space perturbations: r ↦ A r, read as the network reads y
            self.image_map: LinearMap | None = None
            if space == "image":
                self.image_map = self._dense(self._image_to_input, image_shape)
        except NoBound:
            raise
        except Exception as exc:  # noqa: BLE001 - an operator the bound cannot use is a reason
            raise NoBound(
                "the operator cannot be applied to the bound's float64 basis "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc

    def _image_to_input(self, r: torch.Tensor) -> torch.Tensor:
        e = self.operator.A(r)
        return self.operator.A_adjoint(e) if self.adjoint else e

    def _dense(
        self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]
    ) -> LinearMap:
        n = math.prod(shape)
        out = fn(torch.zeros(1, *shape, dtype=torch.float64, device=self.device))
        if n * out[0].numel() > MAX_DENSE_ENTRIES:
            raise NoBound(
                f"the map from the perturbation to the network's input ({out[0].numel()} × {n}) "
                f"is too large to hold densely (at most {MAX_DENSE_ENTRIES} entries)"
            )
        columns = []
        for start in range(0, n, 256):
            stop = min(n, start + 256)
            basis = torch.zeros(stop - start, n, dtype=torch.float64, device=self.device)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            columns.append(fn(basis.view(stop - start, *shape)).reshape(stop - start, -1).T)
        matrix = torch.cat(columns, dim=1).to(torch.float64)
        return LinearMap(fn, matrix, shape, tuple(out.shape[1:]))

    def input_set(self, y: torch.Tensor, radius: float) -> InputSet:
        """The set of network inputs over the level's ball around the measurement y."""
        if self.reader is not None:  # the network reads A*(y + ...)
            base = through_linear_map(self.reader, y, radius)
        else:
            base = InputSet(y, radius, "l2", None if bool((self.mask == 1).all()) else self.mask)
        if self.image_map is None:
            return base
        return InputSet(base.center, radius, "l2", self.image_map.matrix, base.slack)


@contextmanager
def measured(device: torch.device) -> Iterator[dict[str, Any]]:
    """The wall time and peak memory of the block (MEMORY_MEASURES says how)."""
    cost: dict[str, Any] = {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        yield cost
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            peak = max(0, torch.cuda.max_memory_allocated(device) - base)
        else:  # KiB on Linux
            peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
        cost["seconds"] = round(time.perf_counter() - started, 6)
        cost["peak_memory_bytes"] = int(peak)


def merge_bracket(
    config: WorstCaseCheck,
    shards: list[dict[str, Any]],
    images: list[dict[str, Any]],
    table: list[dict[str, Any]],
    found_comparisons: list[dict[str, Any]],
    warnings: list[str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each table row's `certified` bracket, the check's `certify` section and the certified
    comparisons (to follow the search's). The section's `proof` decides `proven`."""
    assert config.certify is not None
    records = [s["certify"] for s in shards if isinstance(s.get("certify"), dict)]
    reason = next((r["reason"] for r in records if r.get("reason")), None)
    threshold = config.threshold
    at_level = None
    if threshold is not None and threshold.max_relative_error is not None:
        at_level = threshold.at_level or config.levels[-1]
    seconds = 0.0
    peak = 0
    for row in table:
        level = row["level"]
        per_image = [
            {"index": image["index"], **_image_entry(r["certified"])}
            for image in images
            for r in image["levels"]
            if r["level"] == level and isinstance(r.get("certified"), dict)
        ]
        searched = sum(1 for image in images for r in image["levels"] if r["level"] == level)
        complete = reason is None and bool(per_image) and len(per_image) == searched
        uppers = [p["upper"] for p in per_image]
        founds = [p["found"] for p in per_image if p["found"] is not None]
        upper = max(uppers) if complete and None not in uppers else None
        found = max(founds) if founds else None
        error_uppers = [p["relative_error_upper"] for p in per_image]
        error_upper = max(error_uppers) if complete and None not in error_uppers else None
        bracket: dict[str, Any] = {
            "found": found,
            "upper": upper,
            "ratio": ratio(upper, found),
            "relative_error": {
                "found": (row.get("relative_error") or {}).get("max"),
                "upper": error_upper,
            },
            "proven": _level_proven(config, level, at_level, upper, error_upper),
            "seconds": round(math.fsum(p["seconds"] for p in per_image), 6),
            "peak_memory_bytes": max((p["peak_memory_bytes"] for p in per_image), default=0),
            "images": per_image,
        }
        seconds += bracket["seconds"]
        peak = max(peak, bracket["peak_memory_bytes"])
        row["certified"] = bracket
    comparisons, _ = _certified_comparisons(config, table, at_level, reason is None)
    policy = config.certify.unproven
    proof, kept = decide_proof(
        threshold is not None, reason, found_comparisons, comparisons, policy, warnings, "search's"
    )
    proven_levels = [row["level"] for row in table if row["certified"]["proven"] is True]
    section = {
        "intermediate": config.certify.intermediate,
        "unproven": policy,
        "quantity": QUANTITY,
        "allowance": ALLOWANCE,
        "reason": reason,
        "proof": proof,
        "proven_level": max(proven_levels) if proven_levels else None,
        "device": records[0]["device"] if records else None,
        "seconds": round(seconds, 6),
        "peak_memory_bytes": peak,
        "memory_measure": records[0]["memory_measure"] if records else None,
    }
    return section, kept


def decide_proof(
    has_threshold: bool,
    reason: str | None,
    found_comparisons: list[dict[str, Any]],
    comparisons: list[dict[str, Any]],
    policy: str,
    warnings: list[str],
    finder: str,
) -> tuple[str | None, list[dict[str, Any]]]:
    """The `proof` (null without a threshold; docs/theorem.md, "Brackets") and the certified
    comparisons the verdict counts under the `unproven` policy (warnings name those left out,
    and a missing bound). `finder` names whose the found values are ("search's"), for them."""
    proof: str | None = None
    if has_threshold:
        if reason is not None:
            proof = "unavailable"
        elif not all(c["passed"] for c in found_comparisons):
            proof = "refuted"
        elif comparisons and all(c["passed"] for c in comparisons):
            proof = "proven"
        else:
            proof = "unproven"
    if reason is not None:
        warnings.append(
            f"no certified bound: {reason}; the verdict is the {finder} alone "
            "(docs/theorem.md, 'Brackets')"
        )
    kept = []
    for comparison in comparisons:
        if comparison["passed"] or policy == "fail":
            kept.append(comparison)
        elif proof == "unproven":
            warnings.append(
                f"not proven: {comparison['quantity']} is {fmt(comparison['measured'])}, above "
                f"the bound {fmt(comparison['bound'])} (or not measured); counted as a pass by "
                "certify.unproven = 'pass'"
            )
    return proof, kept


def _image_entry(certified: dict[str, Any]) -> dict[str, Any]:
    upper_change = certified.get("upper_change")
    clean = certified.get("clean_relative_error")
    x_norm = certified.get("x_norm") or 0.0
    error_upper = None
    if upper_change is not None and clean is not None and x_norm > 0 and math.isfinite(clean):
        error_upper = clean + upper_change / x_norm
    return {
        "found": certified["found"],
        "upper": certified["upper"],
        "ratio": ratio(certified["upper"], certified["found"]),
        "relative_error_upper": error_upper,
        "method": certified["method"],
        "seconds": certified["seconds"],
        "peak_memory_bytes": certified["peak_memory_bytes"],
    }


def ratio(upper: float | None, found: float | None) -> float | None:
    if upper is None or found is None or not found > 0:
        return None
    return upper / found


def within(value: float | None, bound: float) -> bool:
    return value is not None and math.isfinite(value) and value * (1 + ALLOWANCE) <= bound


def _level_proven(
    config: WorstCaseCheck,
    level: float,
    at_level: float | None,
    upper: float | None,
    error_upper: float | None,
) -> bool | None:
    """Whether every bound of the threshold that applies at this level is proven here (null
    when none applies: no threshold, or only max_relative_error at another level)."""
    threshold = config.threshold
    if threshold is None:
        return None
    verdicts = []
    if threshold.max_lipschitz is not None:
        verdicts.append(within(upper, threshold.max_lipschitz))
    if at_level is not None and level == at_level:
        assert threshold.max_relative_error is not None
        verdicts.append(within(error_upper, threshold.max_relative_error))
    return all(verdicts) if verdicts else None


def _certified_comparisons(
    config: WorstCaseCheck, table: list[dict[str, Any]], at_level: float | None, available: bool
) -> tuple[list[dict[str, Any]], bool]:
    """The threshold's bounds against the certified values (U·(1 + ALLOWANCE)); whether any is
    not proven. None without a bound."""
    threshold = config.threshold
    if threshold is None or not available:
        return [], False
    comparisons = []
    if threshold.max_lipschitz is not None:
        uppers = [row["certified"]["upper"] for row in table]
        largest = None if not uppers or None in uppers else max(uppers) * (1 + ALLOWANCE)
        comparisons.append(
            compare(
                "certified upper bound of the worst change per unit radius, largest over levels",
                largest,
                threshold.max_lipschitz,
            )
        )
    if at_level is not None:
        assert threshold.max_relative_error is not None
        row = next((row for row in table if row["level"] == at_level), None)
        upper = None if row is None else row["certified"]["relative_error"]["upper"]
        comparisons.append(
            compare(
                f"certified upper bound of the relative error at level {fmt(at_level)}",
                None if upper is None else upper * (1 + ALLOWANCE),
                threshold.max_relative_error,
            )
        )
    return comparisons, not all(c["passed"] for c in comparisons)
