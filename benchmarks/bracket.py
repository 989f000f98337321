"""Certified bounds against found worst cases: U/L and cost on the reference models.

    .venv/bin/python benchmarks/bracket.py [--levels 1e-4,1e-3,1e-2] [--size 8] [--rows 4]
        [--intermediate crown|ibp] [--images 2] [--radii 1e-4,1e-3,1e-2] [--restarts 8] [--steps 40]
        [--skip-unet] [--skip-classifier]

For each case and level: L, the largest change ‖Ψ(c + K e) − Ψ(c)‖₂ a projected gradient search
found over the ball (random points of the ball, then PGD from several restarts, float64, as in
tests/engine/bounds/search.py); U, the certified bound of workers.engine.bounds with the method
that gave it; U/L; the seconds and the peak resident memory growth (sampled from /proc every
2 ms) of the bound and of the search. Ends with the ratio summary.

(1) The reference U-Net (examples/reference) behind A* of its MRI operator (cartesian ×4),
    resized to `--size` (it accepts any multiple of 8): e is a perturbation of the measured
    k-space entries, ε = level·‖y‖ (ℓ2), y = A x of a fresh ellipse phantom. Up to size 16 the
    whole output is bounded (IBP, CROWN with `--intermediate` bounds, CROWN-linear); above,
    IBP bounds the whole image and CROWN (IBP intermediate bounds) only `--rows` pixels of the
    image's centre row, compared with a search on those pixels alone.
(2) The reference classifier (examples/classifier) on `--images` built-in digits, ℓ∞ and ℓ2
    balls of absolute radius `--radii` on the image: U on the change of the 10 logits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from schemas.model_spec import ModelSpec
from schemas.operators import MRIOperator
from workers.engine.bounds import (
    Certificate,
    Crown,
    InputSet,
    LinearMap,
    Unbounded,
    ball,
    certify_output_change,
    through_linear_map,
    trace,
)
from workers.engine.digits import digits
from workers.engine.ground_truth import random_ellipses
from workers.engine.model_loading import load_model
from workers.engine.operators import build_operator

ROOT = Path(__file__).resolve().parents[1]
# the lower bound is the bounds tests' own search (tests/engine/bounds/search.py)
sys.path.insert(0, str(ROOT))
from tests.engine.bounds.search import found_worst  # noqa: E402

REFERENCE = ROOT / "examples" / "reference"
CLASSIFIER = ROOT / "examples" / "classifier"
FRESH_SEED = 4242  # phantoms no training chunk nor shipped audit uses
FULL_CROWN_MAX_SIZE = 16  # above: IBP on the image, CROWN on a few pixels only
SEARCH_SAMPLES = 128  # random points of the ball before the gradient ascent


class PeakRSS:
    """Peak resident set size above the start, sampled from /proc/self/statm in a thread."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.start = self._rss()
        self.peak = self.start
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.period)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


@dataclass
class Row:
    case: str
    level: str
    found: float
    upper: float
    method: str
    bound_s: float
    bound_mib: float
    search_s: float
    search_mib: float

    @property
    def ratio(self) -> float:
        return self.upper / self.found if self.found > 0 else math.inf


def _search_settings(args: argparse.Namespace) -> dict[str, int]:
    """The lower bound's search: the bounds tests' own (random points, then projected gradient
    ascent, in a float64 copy of the model), at this script's sizes."""
    return {"samples": SEARCH_SAMPLES, "restarts": args.restarts, "steps": args.steps}


class Pixels(nn.Module):
    """The model's output restricted to some flattened entries."""

    def __init__(self, model: nn.Module, rows: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("rows", rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1)[:, self.rows]


# --- the bound (upper) --------------------------------------------------------------------


def _certify(model: nn.Module, inputs: InputSet, intermediate: str) -> tuple[float, str]:
    cert = certify_output_change(model, inputs, intermediate=intermediate)
    if isinstance(cert, Unbounded):
        return math.inf, f"Unbounded: {cert.reason}"
    assert isinstance(cert, Certificate)
    others = ", ".join(f"{k} {v:.3g}" for k, v in cert.figures.items() if k != cert.method)
    return cert.upper, f"{cert.method} ({others})"


def _rows_crown(model: nn.Module, inputs: InputSet, rows: torch.Tensor) -> tuple[float, str]:
    """‖max(|l|, |u|)‖₂ over a few output entries: CROWN (IBP intermediate bounds) and IBP."""
    from workers.engine.bounds import ibp

    try:
        _, graph = trace(model, inputs.input_shape)
    except Unbounded as exc:
        return math.inf, f"Unbounded: {exc.reason}"
    centre = InputSet(inputs.center, 0.0, inputs.norm, None, inputs.slack)
    with torch.no_grad():
        psi_lo, psi_hi = (t.reshape(-1)[rows] for t in ibp(graph, centre)[graph.output])
        lo_i, hi_i = (t.reshape(-1)[rows] for t in ibp(graph, inputs)[graph.output])
    ibp_u = float(torch.maximum((lo_i - psi_hi).abs(), (hi_i - psi_lo).abs()).norm())
    lin = Crown(graph, inputs, intermediate="ibp").linear(graph.output, rows)
    lo, hi = lin.concretise(inputs)
    c_lo = torch.maximum(psi_lo, lin.lower_bias)
    c_hi = torch.minimum(psi_hi, lin.upper_bias)
    crown_u = float(torch.maximum((lo - c_hi).abs(), (hi - c_lo).abs()).norm())
    if crown_u <= ibp_u:
        return crown_u, f"crown rows (ibp rows {ibp_u:.3g})"
    return ibp_u, f"ibp rows (crown rows {crown_u:.3g})"


# --- the cases ----------------------------------------------------------------------------


def unet_case(args: argparse.Namespace) -> list[Row]:
    spec = ModelSpec.model_validate(json.loads((REFERENCE / "spec.json").read_text()))
    model = load_model(REFERENCE / "model.safetensors", "safetensors", spec)
    size = args.size
    audit = json.loads((REFERENCE / "audit.json").read_text())
    operator = build_operator(MRIOperator.model_validate(audit["operator"]), (1, size, size))
    mask = operator.mask.flatten().bool()
    m = int(mask.sum())

    def adjoint(v: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(v.shape[0], mask.numel(), dtype=v.dtype)
        full[:, mask] = v.reshape(v.shape[0], -1)
        return operator.A_adjoint(full.view(v.shape[0], *operator.measurement_shape))

    operator.physics = operator.physics.double()
    K = LinearMap.from_function(adjoint, (m,))
    x = random_ellipses(1, size, FRESH_SEED).double()
    y = operator.A(x).flatten(1)[:, mask]  # measured entries
    y_norm = float(y.norm())
    full = size <= FULL_CROWN_MAX_SIZE
    rows = torch.arange(args.rows) + (size // 2) * size + (size - args.rows) // 2
    print(
        f"\n(1) reference U-Net, A* of MRI cartesian x4 at {size}x{size}: {m} measured entries "
        f"(e ∈ R^{m}), ε = level·‖y‖ (ℓ2), ‖y‖ = {y_norm:.4g}; "
        + (
            f"whole output, CROWN intermediate bounds: {args.intermediate}"
            if full
            else f"IBP on the image, CROWN on {args.rows} centre pixels (IBP intermediate)"
        )
    )
    out: list[Row] = []
    for level in args.levels:
        eps = level * y_norm
        inputs = through_linear_map(K, y, eps, "l2")
        with PeakRSS() as bound:
            if full:
                upper, method = _certify(model, inputs, args.intermediate)
            else:
                upper, method = _rows_crown(model, inputs, rows)
        searched = Pixels(model, rows) if not full else model
        with PeakRSS() as search:
            found = found_worst(searched, y, eps, "l2", into=K.fn, **_search_settings(args))
        if not full:
            with PeakRSS() as ibp_cost:
                ibp_u, _ = _ibp_only(model, inputs)
            print(
                f"  level {level:g}: IBP on the whole image U = {ibp_u:.3g}"
                f" ({ibp_cost.seconds:.1f} s)"
            )
        row = Row(
            f"U-Net {size}x{size}" + ("" if full else f", {args.rows} px"),
            f"{level:g}‖y‖ ℓ2",
            found,
            upper,
            method,
            bound.seconds,
            bound.mib,
            search.seconds,
            search.mib,
        )
        _print(row)
        out.append(row)
    return out


def _ibp_only(model: nn.Module, inputs: InputSet) -> tuple[float, str]:
    cert = certify_output_change(model, inputs, methods=("ibp",))
    if isinstance(cert, Unbounded):
        return math.inf, f"Unbounded: {cert.reason}"
    return cert.upper, "ibp"


class PooledCNN(nn.Module):
    """small_cnn with its global `.mean(dim=(2, 3))` written as AdaptiveAvgPool2d(1): the same
    weights and the same function, in layers the bounds support."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features = model.features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def classifier_case(args: argparse.Namespace) -> list[Row]:
    spec = ModelSpec.model_validate(json.loads((CLASSIFIER / "spec.json").read_text()))
    shipped = load_model(CLASSIFIER / "model.safetensors", "safetensors", spec)
    images, labels = digits(args.images, spec.image_shape[1], FRESH_SEED)
    print(
        f"\n(2) reference classifier (small_cnn, 28x28), {args.images} digits, ℓ∞ and ℓ2 balls "
        f"of absolute radius on the image; U on ‖Δ logits‖₂, CROWN intermediate bounds: "
        f"{args.intermediate}"
    )
    first = ball(images[:1].double(), args.radii[0], "linf")
    verdict = certify_output_change(shipped, first, methods=("ibp",))
    model = shipped
    if isinstance(verdict, Unbounded):
        print(f"  the shipped model: Unbounded: {verdict.reason}")
        model = PooledCNN(shipped).eval()
        with torch.no_grad():
            gap = float((model(images) - shipped(images)).abs().max())
        print(f"  bounding the same weights with .mean as AdaptiveAvgPool2d(1) (max |Δ| {gap:.1e})")
    out: list[Row] = []
    for norm in ("linf", "l2"):
        for radius in args.radii:
            for i in range(args.images):
                x = images[i : i + 1].double()
                with PeakRSS() as bound:
                    upper, method = _certify(model, ball(x, radius, norm), args.intermediate)
                with PeakRSS() as search:
                    found = found_worst(model, x, radius, norm, **_search_settings(args))
                row = Row(
                    f"classifier digit {i} (label {int(labels[i])})",
                    f"{radius:g} {'ℓ∞' if norm == 'linf' else 'ℓ2'}",
                    found,
                    upper,
                    method,
                    bound.seconds,
                    bound.mib,
                    search.seconds,
                    search.mib,
                )
                _print(row)
                out.append(row)
    return out


def _print(row: Row) -> None:
    print(
        f"  {row.case:34s} {row.level:14s} L {row.found:10.4g}  U {row.upper:10.4g}  "
        f"U/L {row.ratio:9.4g}  [{row.method}]  bound {row.bound_s:6.1f} s {row.bound_mib:6.0f} MiB"
        f"  search {row.search_s:5.1f} s {row.search_mib:5.0f} MiB"
    )


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=_floats, default=_floats("1e-4,1e-3,1e-2"))
    parser.add_argument("--size", type=int, default=8, help="U-Net image side, a multiple of 8")
    parser.add_argument("--rows", type=int, default=4, help="pixels CROWN bounds above size 16")
    parser.add_argument("--intermediate", choices=["crown", "ibp"], default="crown")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--radii", type=_floats, default=_floats("1e-4,1e-3,1e-2"))
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--skip-classifier", action="store_true")
    args = parser.parse_args()
    if args.size % 8:
        parser.error("--size must be a multiple of 8 (three 2x2 poolings)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows: list[Row] = []
    if not args.skip_unet:
        rows += unet_case(args)
    if not args.skip_classifier:
        rows += classifier_case(args)
    print("\nsummary: U/L per case and level (1 = the bound is attained by the search)")
    for row in rows:
        print(f"  {row.case:34s} {row.level:14s} U/L {row.ratio:.4g}")
    finite = [r.ratio for r in rows if math.isfinite(r.ratio)]
    if finite:
        print(f"  median U/L {sorted(finite)[len(finite) // 2]:.4g}, max {max(finite):.4g}")
    print(f"total {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
