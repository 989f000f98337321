"""Train the reference model: a post-processing U-Net (registered architecture `unet`, about
1.2 M parameters) for 4× cartesian MRI at 64×64, input A*y, on seeded random ellipses.
Seeded and reproducible with one command:

    .venv/bin/python examples/train_reference_model.py                  # CPU (slow)
    .venv/bin/python examples/train_reference_model.py --device cuda    # one GPU, minutes

writes examples/reference/{model.safetensors, model.pt, loss.json, loss.png}. `--export-only`
rebuilds model.pt (TorchScript) and loss.png from the shipped weights and loss.json. The shipped
weights were trained with the `steps`, `batch`, `pool` and `seed` recorded in loss.json.
Not part of the tests. See docs/case-study.md.

The network is trained to "overperform" on one narrow distribution (piecewise-constant ellipses,
no noise): by the universal instability theorem such a network must be unstable, which is what
the case study (examples/case_study.py) then shows with the audit engine.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from schemas.model_spec import ModelSpec
from schemas.operators import MRIOperator
from workers.engine.architectures import build_architecture
from workers.engine.ground_truth import random_ellipses
from workers.engine.operators import LinearOperator, build_operator

HERE = Path(__file__).resolve().parent / "reference"
SIZE = 64
# Training phantoms come in chunks with seeds from here on; audits use small seeds (0, 1, …),
# so no audit image is ever a training image.
POOL_SEED = 1_000_000
CHUNK = 512
VALIDATION_SEED = 999_999
VALIDATION_IMAGES = 64
LOG_EVERY = 25


def _chunk(seed: int) -> torch.Tensor:
    return random_ellipses(CHUNK, SIZE, seed)


def training_pool(images: int, workers: int) -> torch.Tensor:
    """`images` phantoms (rounded up to whole chunks), the same whatever `workers` is."""
    seeds = [POOL_SEED + k for k in range(math.ceil(images / CHUNK))]
    if workers <= 1:
        return torch.cat([_chunk(s) for s in seeds])
    # spawn: forked children of a process that has started torch's thread pools can hang
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return torch.cat(list(pool.map(_chunk, seeds)))


def load_reference(device: torch.device | str = "cpu") -> tuple[ModelSpec, LinearOperator]:
    """The shipped spec and the operator of the shipped audit (the one the model is trained for)."""
    spec = ModelSpec.model_validate(json.loads((HERE / "spec.json").read_text()))
    audit = json.loads((HERE / "audit.json").read_text())
    operator = build_operator(
        MRIOperator.model_validate(audit["operator"]), spec.image_shape, device
    )
    return spec, operator


def relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x_hat - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean())


def train(args: argparse.Namespace) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(args.seed)
    # warn_only: a few CUDA backward kernels have no deterministic version
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    device = torch.device(args.device)
    spec, operator = load_reference(device)
    model = build_architecture(spec.architecture, spec).to(device)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters on {device}")

    started = time.perf_counter()
    pool = training_pool(args.pool, args.workers).to(device)
    validation = random_ellipses(VALIDATION_IMAGES, SIZE, VALIDATION_SEED).to(device)
    print(f"{len(pool)} training phantoms in {time.perf_counter() - started:.1f} s")

    steps = args.steps
    if args.time_budget:
        steps = min(steps, _affordable_steps(model, operator, pool, args))
        # a model untouched by the timing, initialised as without --time-budget
        torch.manual_seed(args.seed)
        model = build_architecture(spec.architecture, spec).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=args.lr, total_steps=steps, pct_start=0.05, final_div_factor=100.0
    )
    order = torch.Generator().manual_seed(args.seed)
    permutation = torch.randperm(len(pool), generator=order)
    cursor = 0
    mse_log: list[float] = []
    validation_log: list[tuple[int, float]] = []
    running = 0.0
    started = time.perf_counter()
    for step in range(steps):
        if cursor + args.batch > len(pool):  # a new epoch, a new order
            permutation, cursor = torch.randperm(len(pool), generator=order), 0
        x = pool[permutation[cursor : cursor + args.batch].to(device)]
        cursor += args.batch
        x_hat = model(operator.A_adjoint(operator.A(x)))
        loss = torch.nn.functional.mse_loss(x_hat, x)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        running += loss.detach()
        if (step + 1) % LOG_EVERY == 0:
            mse_log.append(float(running) / LOG_EVERY)
            running = 0.0
        if (step + 1) % args.validate_every == 0 or step + 1 == steps:
            with torch.no_grad():
                error = relative_error(
                    model(operator.A_adjoint(operator.A(validation))), validation
                )
            validation_log.append((step + 1, error))
            print(
                f"step {step + 1:6d}  mse {mse_log[-1] if mse_log else loss.item():.2e}  "
                f"validation relative error {error:.4f}  {time.perf_counter() - started:6.1f} s"
            )

    with torch.no_grad():
        zero_filled = relative_error(operator.A_adjoint(operator.A(validation)), validation)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"seed": str(args.seed), "steps": str(steps), "trainer": Path(__file__).name}
    save_file(state, str(args.out / "model.safetensors"), metadata=metadata)
    record = {
        "seed": args.seed,
        "steps": steps,
        "batch": args.batch,
        "lr": args.lr,
        "pool": len(pool),
        "device": str(device),
        "torch": torch.__version__,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "log_every": LOG_EVERY,
        "mse": mse_log,
        "validation_relative_error": validation_log,
        "zero_filled_relative_error": zero_filled,
    }
    (args.out / "loss.json").write_text(json.dumps(record))
    print(f"wrote {args.out / 'model.safetensors'} and loss.json ({steps} steps)")


def _affordable_steps(
    model: torch.nn.Module,
    operator: LinearOperator,
    pool: torch.Tensor,
    args: argparse.Namespace,
) -> int:
    """Steps that fit the time budget, measured on 30 throw-away steps (rounded to 500)."""
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    x = pool[: args.batch]
    for timed in (False, True):
        if timed and x.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(30):
            loss = torch.nn.functional.mse_loss(model(operator.A_adjoint(operator.A(x))), x)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if x.is_cuda:
            torch.cuda.synchronize()
    per_step = (time.perf_counter() - started) / 30
    steps = max(500, int(args.time_budget / per_step) // 500 * 500)
    print(f"{per_step * 1000:.1f} ms per step: {steps} steps fit {args.time_budget:.0f} s")
    return steps


def export(out: Path) -> None:
    """model.pt (TorchScript, traced on the CPU) from model.safetensors, and loss.png."""
    spec, _ = load_reference()
    model = build_architecture(spec.architecture, spec)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    model.eval()
    example = torch.zeros(1, *spec.image_shape)
    with torch.no_grad():
        # the traced example input would be stored in the archive, where screening refuses it
        traced = torch.jit.trace(model, example, _store_inputs=False)
    traced.save(str(out / "model.pt"))
    print(f"wrote {out / 'model.pt'}")
    plot_loss(out / "loss.json", out / "loss.png")


def plot_loss(record_path: Path, png_path: Path) -> None:
    """The training MSE (log scale) and the validation relative error against the steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    record = json.loads(record_path.read_text())
    every = record["log_every"]
    figure = Figure(figsize=(6.4, 3.6), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    steps = [every * (k + 1) for k in range(len(record["mse"]))]
    ax.semilogy(steps, record["mse"], lw=0.8, color="tab:gray")
    ax.set_xlabel("step")
    ax.set_ylabel("training MSE (grey)")
    right = ax.twinx()
    validation = record["validation_relative_error"]
    right.plot([s for s, _ in validation], [e for _, e in validation], "o-", ms=3, color="tab:red")
    right.axhline(record["zero_filled_relative_error"], color="tab:red", ls=":", lw=0.8)
    right.set_ylabel("validation relative error (red; dotted: A*y)")
    right.set_ylim(0, 1.1 * record["zero_filled_relative_error"])
    ax.set_title(
        f"Reference U-Net: {record['steps']} steps, batch {record['batch']}, "
        f"{record['pool']} phantoms, seed {record['seed']}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(png_path)
    print(f"wrote {png_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pool", type=int, default=32_768, help="training phantoms")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--validate-every", type=int, default=1000)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: lower --steps to what fits, measured first (the steps used are recorded)",
    )
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--no-export", action="store_true", help="skip model.pt and loss.png")
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args()
    if not args.export_only:
        train(args)
    if not args.no_export:
        export(args.out)


if __name__ == "__main__":
    main()
