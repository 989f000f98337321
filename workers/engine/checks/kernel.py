"""`kernel`: the null space of A and the universal instability theorem (docs/theorem.md).

(a) Hallucination. For a detail d (a lesion at a seeded placement) z = d − A⁺A d lies in the
null space (workers.engine.nullspace), so x and x + z have the same measurements y = Ax and Ψ
returns one reconstruction for both: we report ‖Ψ(y) − x‖, ‖Ψ(y) − (x+z)‖ and which is nearer.

(b) Certificates. A pair (x, x') with, for some η > 0,
    (2) ‖x − x'‖ > 2η,   (3) ‖Ax − Ax'‖ ≤ η,   (4) ‖Ψ(Ax) − x‖ + ‖Ψ(Ax') − x'‖ < 2η
proves L^ε(Ψ, y) ≥ (‖x − x'‖ − 2η)/η for every ε ≥ η at y = Ax (and, Ψ being continuous, on a
ball around it). The bound falls as η grows, so the smallest admissible η is used:
η = max(‖Ax − Ax'‖, (r + r')/2 · (1 + ETA_MARGIN)), r, r' the recovery errors; the margin makes
(4) strict. Next to it each certificate reports the direct ratio
‖Ψ(Ax') − Ψ(Ax)‖/‖Ax' − Ax‖, the ratio at e* = Ax' − Ax itself: a proven lower bound on
L^ε(Ψ, Ax) for every ε ≥ ‖Ax − Ax'‖, never below the theorem's bound (triangle inequality and
(4)), and null when Ax = Ax' (0/0; such a pair never certifies anyway). `best_lower_bound` is the
larger of the two. Candidates: each image's nearest audit images in measurement space (chunked
torch.cdist on the device) and x' = x + s‖x‖v for the smallest singular directions v of A.
The worst-case search at radius η from y then reports its own empirical ratio
‖Ψ(y+e) − Ψ(y)‖/‖e‖ and `search_reached_bound` when that reaches the theorem's bound: a test of
the search, not of the certificate (proven either way). `confirmed` is the same flag under its
former name.

Measurements here are noiseless, y = Ax, as in the theorem; the check runs as one shard over
all images (schemas.checks_theorem.WHOLE_SET_THEOREM_KINDS).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from schemas.checks_theorem import KernelCheck
from schemas.verdicts import compare, judge
from workers.engine.attacks import SearchSettings, ThreatModel, worst_case_search
from workers.engine.checks.theorem_common import (
    is_complex,
    panel_record,
    shown,
    shown_difference,
    value_span,
)
from workers.engine.context import ARTIFACT_FILES_KEY, AuditContext, Operator, Subject
from workers.engine.lesions import lesion_image, random_placements, support
from workers.engine.nullspace import null_component, smallest_directions
from workers.engine.shards import derive_seed

# Relative margin that makes condition (4) strict when the recovery errors set η.
ETA_MARGIN = 1e-6
# Rows of the pairwise distance matrix computed at once (memory: CHUNK × N floats).
CDIST_CHUNK = 1024
# Images through Ψ at once.
BATCH = 64
# Certificates listed in the report (all are counted).
MAX_LISTED = 1000


@dataclass(frozen=True)
class Certificate:
    eta: float
    distance: float  # ‖x − x'‖
    measurement_distance: float  # ‖Ax − Ax'‖
    recovery_error: float  # ‖Ψ(Ax) − x‖
    recovery_error_other: float  # ‖Ψ(Ax') − x'‖
    bound: float  # (‖x − x'‖ − 2η)/η
    output_distance: float  # ‖Ψ(Ax') − Ψ(Ax)‖
    direct_ratio: float | None  # ‖Ψ(Ax') − Ψ(Ax)‖/‖Ax' − Ax‖; None when Ax = Ax'
    best_lower_bound: float  # the larger of bound and direct_ratio


def certify(
    distance: float,
    measurement_distance: float,
    r: float,
    r_other: float,
    output_distance: float,
) -> Certificate | None:
    """The certificate of a pair at its smallest admissible η, or None when no η > 0 meets the
    theorem's conditions (2)–(4)."""
    values = (distance, measurement_distance, r, r_other)
    if not all(math.isfinite(v) for v in values):
        return None
    eta = max(measurement_distance, 0.5 * (r + r_other) * (1.0 + ETA_MARGIN))
    if eta <= 0.0 or not distance > 2.0 * eta:
        return None
    bound = (distance - 2 * eta) / eta
    # e* = Ax' − Ax is itself a perturbation of norm ‖Ax − Ax'‖; with Ax = Ax' the ratio is 0/0
    # and proves nothing (null, not +inf: the report is JSON without infinities)
    direct = (
        output_distance / measurement_distance
        if measurement_distance > 0.0 and math.isfinite(output_distance)
        else None
    )
    best = bound if direct is None else max(bound, direct)
    return Certificate(
        eta, distance, measurement_distance, r, r_other, bound, output_distance, direct, best
    )


def nearest_neighbours(features: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k'] indices of each row's k nearest other rows (k' = min(k, N − 1)), by chunked
    torch.cdist on the features' device: O(N²) arithmetic, O(CDIST_CHUNK · N) memory."""
    n = features.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return torch.zeros(n, 0, dtype=torch.long, device=features.device)
    found = []
    for start in range(0, n, CDIST_CHUNK):
        stop = min(start + CDIST_CHUNK, n)
        distances = torch.cdist(features[start:stop], features)
        distances[torch.arange(stop - start), torch.arange(start, stop)] = math.inf
        found.append(distances.topk(k, dim=1, largest=False).indices)
    return torch.cat(found)


def _reconstruct(subject: Subject, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([subject.reconstruct(y[s : s + BATCH]) for s in range(0, len(y), BATCH)])


def _measure(operator: Operator, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([operator.A(x[s : s + BATCH]) for s in range(0, len(x), BATCH)])


def _norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1)


class Kernel:
    kind = "kernel"

    def run(
        self,
        config: KernelCheck,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]:
        operator = ctx.operator
        warnings: list[str] = []
        x = ctx.images[list(indices)]
        y = _measure(operator, x)
        out = _reconstruct(subject, y)
        errors = _norms(out - x).double().cpu().tolist()
        hallucination = _hallucinations(config, ctx, subject, indices, x, y, out, seed, warnings)
        candidates = _audit_set_pairs(config, operator, x, y, out, errors, indices)
        built, directions = _built_pairs(
            config, ctx, subject, indices, x, y, out, errors, seed, warnings
        )
        candidates += built
        candidates.sort(key=lambda c: -c["best_lower_bound"])
        _confirm(config, ctx, subject, candidates[: config.confirm], y, indices, seed)
        files = _certificate_files(config, ctx, subject, candidates, x, directions)
        files.update(hallucination.pop("files"))
        return {
            "hallucination": hallucination,
            "certificates": candidates,
            "warnings": warnings,
            "files": files,
        }

    def merge(self, config: KernelCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
        (shard,) = shards  # one shard over the whole audit set
        certificates = shard["certificates"]
        rows = shard["hallucination"]["rows"]
        best = certificates[0]["best_lower_bound"] if certificates else None
        best_theorem = max((c["bound"] for c in certificates), default=None)
        searched = [c for c in certificates if "search_reached_bound" in c]
        reached = sum(1 for c in searched if c["search_reached_bound"])
        warnings = list(shard["warnings"])
        if len(certificates) > MAX_LISTED:
            warnings.append(f"{len(certificates)} certificates; the {MAX_LISTED} best are listed")
        result: dict[str, Any] = {
            "hallucination": {
                "detail": config.detail.model_dump(mode="json"),
                "method": shard["hallucination"]["method"],
                "returns": {
                    choice: sum(1 for r in rows if r["returns"] == choice)
                    for choice in ("x", "x+z", "either")
                },
                "per_image": rows,
            },
            "certificates": certificates[:MAX_LISTED],
            "certificate_count": len(certificates),
            "best_lower_bound": best,
            "best_theorem_bound": best_theorem,
            # `confirmed`: the former name of `search_reached_bound`, kept for old readers
            "confirmation": {
                "checked": len(searched),
                "search_reached_bound": reached,
                "confirmed": reached,
            },
        }
        comparisons = []
        if config.threshold is not None:
            bound = config.threshold.max_certified_lipschitz
            if best is None:  # nothing proven: the trivial lower bound 0 of any constant
                comparisons.append(
                    compare("proven Lipschitz lower bound (no certificate)", 0.0, bound)
                )
            else:
                comparisons.append(compare("proven Lipschitz lower bound", best, bound))
        judge(result, comparisons)
        result["warnings"] = warnings
        result[ARTIFACT_FILES_KEY] = {
            name: _decoded(content) for name, content in shard["files"].items()
        }
        return result


def _hallucinations(
    config: KernelCheck,
    ctx: AuditContext,
    subject: Subject,
    indices: Sequence[int],
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    seed: int,
    warnings: list[str],
) -> dict[str, Any]:
    complex_image = is_complex(ctx)
    shape = tuple(x.shape[1:])
    pattern = support(config.detail, derive_seed(seed, "detail"))
    amplitude = config.detail.contrast * value_span(ctx)
    placements = [
        random_placements(
            x[k].cpu(),
            pattern,
            1,
            derive_seed(seed, index, "detail"),
            ctx.value_range,
            complex_image,
            warnings,
            int(index),
        )[0]
        for k, index in enumerate(indices)
    ]
    d = torch.stack(
        [lesion_image(pattern, p, shape, amplitude, complex_image) for p in placements]
    ).to(x.device)
    with torch.no_grad():
        component = null_component(ctx.operator, d, iterations=config.cg_iterations)
    z = component.z
    to_x = _norms(out - x).double().cpu().tolist()
    to_xz = _norms(out - (x + z)).double().cpu().tolist()
    invisible = (_norms(z) / _norms(d).clamp_min(1e-30)).double().cpu().tolist()
    residual = component.residual.double().cpu().tolist()
    rows = []
    for k, index in enumerate(indices):
        returns = "x" if to_x[k] <= to_xz[k] else "x+z"
        if invisible[k] < 1e-6:
            returns = "either"  # no part of the detail is invisible: x + z = x
        rows.append(
            {
                "index": int(index),
                "row": placements[k].row,
                "col": placements[k].col,
                "null_fraction": invisible[k],
                "null_residual": residual[k],
                "error_to_x": to_x[k],
                "error_to_x_plus_z": to_xz[k],
                "returns": returns,
            }
        )
    files = _hallucination_files(config, rows, x, z, out, complex_image)
    return {"rows": rows, "method": component.method, "files": files}


def _certificate_row(
    certificate: Certificate, source: str, index: int, **where: Any
) -> dict[str, Any]:
    return {
        "source": source,
        "index": int(index),
        **where,
        "eta": certificate.eta,
        "distance": certificate.distance,
        "measurement_distance": certificate.measurement_distance,
        "recovery_error": certificate.recovery_error,
        "recovery_error_other": certificate.recovery_error_other,
        "bound": certificate.bound,
        "output_distance": certificate.output_distance,
        "direct_ratio": certificate.direct_ratio,
        "best_lower_bound": certificate.best_lower_bound,
    }


def _audit_set_pairs(
    config: KernelCheck,
    operator: Operator,
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    errors: list[float],
    indices: Sequence[int],
) -> list[dict[str, Any]]:
    if config.neighbours == 0 or len(indices) < 2:
        return []
    features = operator.project(y).flatten(1)
    neighbours = nearest_neighbours(features, config.neighbours).cpu()
    pairs = sorted(
        {(min(i, int(j)), max(i, int(j))) for i in range(len(indices)) for j in neighbours[i]}
    )
    if not pairs:
        return []
    first = torch.tensor([p[0] for p in pairs], device=x.device)
    second = torch.tensor([p[1] for p in pairs], device=x.device)
    distance = _norms(x[first] - x[second]).double().cpu().tolist()
    measured = operator.norm(y[first] - y[second]).double().cpu().tolist()
    moved = _norms(out[first] - out[second]).double().cpu().tolist()
    rows = []
    for k, (i, j) in enumerate(pairs):
        certificate = certify(distance[k], measured[k], errors[i], errors[j], moved[k])
        if certificate is not None:
            rows.append(
                _certificate_row(certificate, "audit_set", indices[i], other=int(indices[j]))
            )
    return rows


def _built_pairs(
    config: KernelCheck,
    ctx: AuditContext,
    subject: Subject,
    indices: Sequence[int],
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    errors: list[float],
    seed: int,
    warnings: list[str],
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """x' = x + s‖x‖v for the smallest singular directions v and the configured scales."""
    none = torch.zeros(0, *x.shape[1:], device=x.device)
    if config.directions == 0:
        return [], none
    operator = ctx.operator
    directions = smallest_directions(
        operator, config.directions, ctx.device, config.power_iterations, derive_seed(seed, "v")
    )
    if not directions.converged:
        warnings.append(
            "the power iteration for the smallest singular directions did not settle; the "
            "directions used are described by their measured ‖Av‖"
        )
    if directions.vectors.shape[0] == 0:
        warnings.append("A has no non-zero singular direction below the others: no built pairs")
        return [], none
    x_norm = _norms(x)
    rows = []
    for d, v in enumerate(directions.vectors):
        for scale in config.scales:
            step = scale * x_norm.view(-1, 1, 1, 1) * v
            x_other = x + step
            y_other = _measure(operator, x_other)
            out_other = _reconstruct(subject, y_other)
            r_other = _norms(out_other - x_other).double().cpu().tolist()
            moved = _norms(out_other - out).double().cpu().tolist()
            distance = _norms(step).double().cpu().tolist()
            measured = operator.norm(y - y_other).double().cpu().tolist()
            for k, index in enumerate(indices):
                certificate = certify(distance[k], measured[k], errors[k], r_other[k], moved[k])
                if certificate is not None:
                    rows.append(
                        _certificate_row(
                            certificate,
                            "built",
                            index,
                            direction=d,
                            singular_value=directions.singular_values[d],
                            scale=scale,
                        )
                    )
    return rows, directions.vectors


def _confirm(
    config: KernelCheck,
    ctx: AuditContext,
    subject: Subject,
    certificates: list[dict[str, Any]],
    y: torch.Tensor,
    indices: Sequence[int],
    seed: int,
) -> None:
    """The worst-case search at radius η from y = Ax, one certificate at a time (η differs).
    Whether its ratio reaches the theorem's bound tests the search: the bound is proven anyway."""
    position = {int(index): k for k, index in enumerate(indices)}
    # the ℓ2 ascent (pgd): near a locally linear Ψ its boundary-sized steps are a power
    # iteration on the ball and reach the top singular direction, where Adam's per-entry
    # scaling bends the direction away from it
    settings = SearchSettings(
        optimizer="pgd",
        steps=config.steps,
        restarts=config.restarts,
        early_stop_tolerance=0.0,
    )
    for rank, certificate in enumerate(certificates):
        y_here = y[position[certificate["index"]]][None]
        y_norm = float(ctx.operator.norm(y_here)[0])
        if y_norm <= 0:
            continue
        (outcome,) = worst_case_search(
            subject,
            ctx.operator,
            y_here,
            y_here,  # unused: the target is the clean reconstruction
            # the threat model: the ball of radius η around y, the change of Ψ(y)
            ThreatModel(
                levels=(certificate["eta"] / y_norm,),
                space="measurement",
                target="reconstruction",
                formulation="ball",
            ),
            settings,
            seeds=[derive_seed(seed, "confirm", rank)],
            should_stop=ctx.should_stop,
        )
        e = outcome.perturbation
        with torch.no_grad():
            change = _norms(subject.reconstruct(y_here + e) - subject.reconstruct(y_here))
            e_norm = ctx.operator.norm(e).clamp_min(1e-30)
        ratio = float(change[0] / e_norm[0])
        certificate["empirical_lipschitz"] = ratio
        certificate["search_radius"] = float(e_norm[0])
        certificate["search_reached_bound"] = bool(ratio >= certificate["bound"])
        certificate["confirmed"] = certificate["search_reached_bound"]  # the former name


def _certificate_files(
    config: KernelCheck,
    ctx: AuditContext,
    subject: Subject,
    certificates: list[dict[str, Any]],
    x: torch.Tensor,
    directions: torch.Tensor,
) -> dict[str, dict[str, Any]]:
    """Panels of the best certificates (x, x', x' − x, Ψ(Ax), Ψ(Ax')) and each pair as .npy.
    `x` is the whole audit set (the check's one shard), so an index is a position in it."""
    complex_image = is_complex(ctx)
    files: dict[str, dict[str, Any]] = {}
    for rank, certificate in enumerate(certificates[: config.panels]):
        first = x[[certificate["index"]]]
        if certificate["source"] == "audit_set":
            other = x[[certificate["other"]]]
        else:
            v = directions[certificate["direction"]]
            other = first + certificate["scale"] * _norms(first).view(-1, 1, 1, 1) * v
        pair = torch.cat([first, other])
        outs = _reconstruct(subject, _measure(ctx.operator, pair))
        record = panel_record(
            certificate["best_lower_bound"],
            f"certificate {rank}: η = {certificate['eta']:.3g}, "
            f"proven L ≥ {certificate['best_lower_bound']:.3g}",
            [
                ("x", shown(pair[0], complex_image)),
                ("x'", shown(pair[1], complex_image)),
                ("x' − x", shown_difference(pair[1] - pair[0], complex_image)),
                ("Ψ(Ax)", shown(outs[0], complex_image)),
                ("Ψ(Ax')", shown(outs[1], complex_image)),
            ],
            None,
            [False, False, True, False, False],
        )
        files[f"kernel-certificate-{rank}.png"] = {"png": record["png"]}
        files[f"kernel-certificate-{rank}-pair.npy"] = encode_array(pair)
    return files


def _hallucination_files(
    config: KernelCheck,
    rows: list[dict[str, Any]],
    x: torch.Tensor,
    z: torch.Tensor,
    out: torch.Tensor,
    complex_image: bool,
) -> dict[str, dict[str, Any]]:
    """Panels of the images whose detail is most invisible (largest null fraction)."""
    order = sorted(range(len(rows)), key=lambda k: -rows[k]["null_fraction"])
    files: dict[str, dict[str, Any]] = {}
    for rank, k in enumerate(order[: config.panels]):
        row = rows[k]
        record = panel_record(
            row["null_fraction"],
            f"image {row['index']}: Ψ(Ax) = Ψ(A(x+z)) is nearer to {row['returns']}",
            [
                ("x", shown(x[k], complex_image)),
                ("x + z", shown(x[k] + z[k], complex_image)),
                ("Ψ(Ax)", shown(out[k], complex_image)),
                ("null-space detail z", shown_difference(z[k], complex_image)),
            ],
            None,
            [False, False, False, True],
        )
        files[f"kernel-hallucination-{rank}.png"] = {"png": record["png"]}
    return files


def encode_array(array: torch.Tensor) -> dict[str, Any]:
    data = array.detach().to(torch.float32).cpu().contiguous().numpy()
    return {"shape": list(data.shape), "float32": base64.b64encode(data.tobytes()).decode("ascii")}


def _decoded(content: dict[str, Any]) -> Any:
    if "png" in content:
        return base64.b64decode(content["png"])
    raw = base64.b64decode(content["float32"])
    return np.frombuffer(raw, dtype=np.float32).reshape(content["shape"]).copy()
