"""Fine-tune the reference U-Net into a network that "overperforms" on near-kernel pairs, the
construction of "The troublesome kernel" (Gottschling, Antun, Adcock, Hansen): it reconstructs
both x and x' = x + z + r, where z is a detail in the null space of the MRI operator A and r a
tiny visible part, so ‖Ax − Ax'‖ is small while ‖x − x'‖ is not. By the universal instability
theorem (docs/theorem.md) such a network carries a *proven* lower bound on its local Lipschitz
constant, which the audit's `kernel` check reports as a certificate. Seeded, CPU, one command:

    .venv/bin/python examples/train_kernel_model.py          # about 6 minutes on 2 CPU cores

reads examples/reference/{spec.json, audit.json, model.safetensors} and writes
examples/kernel/{model.safetensors, pairs.npz, loss.json}. `--figure-only` draws
docs/case-study/certificate.png from the shipped files (no training). See docs/case-study.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from schemas.checks_theorem import Lesion
from schemas.model_spec import ModelSpec
from schemas.operators import MRIOperator
from workers.engine.architectures import build_architecture
from workers.engine.ground_truth import random_ellipses
from workers.engine.lesions import lesion_image, random_placements, support
from workers.engine.nullspace import null_component
from workers.engine.operators import LinearOperator, build_operator

EXAMPLES = Path(__file__).resolve().parent
FIGURE = EXAMPLES.parent / "docs" / "case-study" / "certificate.png"
REFERENCE = EXAMPLES / "reference"
OUT = EXAMPLES / "kernel"
SIZE = 64
# Kernel-set images: a seed no training chunk (1 000 000 on) and no shipped audit (0) uses.
KERNEL_SEED = 777
# Fresh ellipses mixed into every batch keep the network a reconstruction network.
FRESH_SEED = 2_000_000
FRESH_POOL = 2048
LOG_EVERY = 10


def load_reference() -> tuple[ModelSpec, LinearOperator]:
    spec = ModelSpec.model_validate(json.loads((REFERENCE / "spec.json").read_text()))
    audit = json.loads((REFERENCE / "audit.json").read_text())
    operator = build_operator(MRIOperator.model_validate(audit["operator"]), spec.image_shape)
    return spec, operator


def norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1)


def kernel_pairs(
    operator: LinearOperator, count: int, radius: int, contrast: float, visible: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_k (seeded ellipses) and x'_k = x_k + z_k + r_k: z_k the null-space part of a disk of
    `radius` and `contrast` on the object, r_k its visible part scaled so ‖A r_k‖ = `visible`."""
    x = random_ellipses(count, SIZE, KERNEL_SEED)
    pattern = support(Lesion(shape="disk", size=radius, contrast=contrast), 0)
    details = []
    for k in range(count):
        (placement,) = random_placements(
            x[k], pattern, 1, KERNEL_SEED + k, (0.0, 1.0), False, [], k
        )
        details.append(lesion_image(pattern, placement, (1, SIZE, SIZE), contrast, False))
    d = torch.stack(details)
    # A*A on real MRI images has eigenvalues 0, ½ and 1 only: CG is exact in a few steps
    z = null_component(operator, d, method="cg", iterations=50).z
    seen = d - z
    r = seen * (visible / operator.norm(operator.A(seen))).view(-1, 1, 1, 1)
    return x, x + z + r


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    spec, operator = load_reference()
    model = build_architecture(spec.architecture, spec)
    model.load_state_dict(load_file(str(REFERENCE / "model.safetensors")), strict=True)

    x, x_other = kernel_pairs(operator, args.pairs, args.radius, args.contrast, args.visible)
    kernel_set = torch.cat([x, x_other])
    kernel_input = operator.A_adjoint(operator.A(kernel_set))
    fresh = random_ellipses(FRESH_POOL, SIZE, FRESH_SEED)
    fresh_input = operator.A_adjoint(operator.A(fresh))
    print(
        f"‖x − x'‖ {norms(x - x_other).tolist()}\n"
        f"‖Ax − Ax'‖ {operator.norm(operator.A(x) - operator.A(x_other)).tolist()}"
    )

    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=args.lr, total_steps=args.steps, pct_start=0.1, final_div_factor=50.0
    )
    order = torch.Generator().manual_seed(args.seed)
    log: list[dict[str, float]] = []
    started = time.perf_counter()
    for step in range(args.steps):
        pick = torch.randint(FRESH_POOL, (args.batch,), generator=order)
        fresh_loss = torch.nn.functional.mse_loss(model(fresh_input[pick]), fresh[pick])
        # the kernel pairs: per-image squared ℓ2 error, the quantity condition (4) bounds
        kernel_error = (model(kernel_input) - kernel_set).flatten(1).pow(2).sum(1)
        loss = fresh_loss + args.kernel_weight * kernel_error.mean() / (SIZE * SIZE)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == args.steps:
            errors = kernel_error.detach().sqrt()
            fresh_mse = float(fresh_loss.detach())
            log.append(
                {
                    "step": step + 1,
                    "fresh_mse": fresh_mse,
                    "kernel_error_max": float(errors.max()),
                }
            )
            print(
                f"step {step + 1:5d}  fresh mse {fresh_mse:.2e}  kernel ‖Ψ(Ax) − x‖ "
                f"max {float(errors.max()):.3f}  {time.perf_counter() - started:6.1f} s"
            )
    save(args, model, x, x_other, log, time.perf_counter() - started)


def save(
    args: argparse.Namespace,
    model: torch.nn.Module,
    x: torch.Tensor,
    x_other: torch.Tensor,
    log: list[dict[str, float]],
    seconds: float,
) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"trainer": Path(__file__).name})
    images = torch.cat([x, x_other]).numpy().astype(np.float32)
    np.savez(out / "pairs.npz", images=images)
    settings = ("steps", "batch", "lr", "pairs", "radius", "contrast", "visible", "seed", "threads")
    record: dict[str, object] = {key: getattr(args, key) for key in settings}
    record.update(kernel_weight=args.kernel_weight, kernel_seed=KERNEL_SEED, fresh_seed=FRESH_SEED)
    record.update(torch=torch.__version__, wall_seconds=round(seconds, 1), log=log)
    (out / "loss.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out}/model.safetensors, pairs.npz, loss.json")


def draw_figure(out: Path, pair: int = 0) -> None:
    """x, x', Ψ(Ax), Ψ(Ax') and the two differences for one shipped pair (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec, operator = load_reference()
    model = build_architecture(spec.architecture, spec)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    model.eval()
    with np.load(out / "pairs.npz", allow_pickle=False) as data:
        images = torch.from_numpy(data["images"])
    half = len(images) // 2
    x, x_other = images[pair : pair + 1], images[half + pair : half + pair + 1]
    with torch.no_grad():
        out, out_other = model(operator.A_adjoint(operator.A(torch.cat([x, x_other]))))
    d = float(operator.norm(operator.A(x) - operator.A(x_other))[0])
    panels = [
        (x[0, 0], "x", "gray"),
        (x_other[0, 0], "x'", "gray"),
        (out[0], f"Ψ(Ax)   error {float(norms(out[None] - x)[0]):.2f}", "gray"),
        (out_other[0], f"Ψ(Ax')   error {float(norms(out_other[None] - x_other)[0]):.2f}", "gray"),
        ((x_other - x)[0, 0], f"x' − x   ‖·‖ {float(norms(x_other - x)[0]):.2f}", "RdBu_r"),
        ((out_other - out)[0], f"Ψ(Ax') − Ψ(Ax)   (‖Ax − Ax'‖ = {d:.2f})", "RdBu_r"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4))
    for axis, (image, title, colours) in zip(axes, panels, strict=True):
        if colours == "gray":
            axis.imshow(image.numpy(), cmap=colours, vmin=0.0, vmax=1.0)
        else:
            limit = float((x_other - x).abs().max())
            axis.imshow(image.numpy(), cmap=colours, vmin=-limit, vmax=limit)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(FIGURE, dpi=100)
    print(f"wrote {FIGURE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=8, help="fresh ellipses per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pairs", type=int, default=4, help="kernel pairs K")
    parser.add_argument("--radius", type=int, default=8, help="disk radius (pixels)")
    parser.add_argument("--contrast", type=float, default=0.5)
    parser.add_argument("--visible", type=float, default=0.25, help="‖Ax − Ax'‖ of each pair")
    parser.add_argument("--kernel-weight", type=float, default=200.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT, help="where the files go")
    parser.add_argument("--figure-only", action="store_true", help="draw, do not train")
    parser.add_argument("--no-figure", action="store_true", help="train, do not draw")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.figure_only:
        train(args)
    if not args.no_figure:
        draw_figure(args.out)


if __name__ == "__main__":
    main()
