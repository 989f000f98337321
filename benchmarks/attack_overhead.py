"""How much the worst-case search costs beyond the network itself, and what batching buys.

    .venv/bin/python benchmarks/attack_overhead.py [--device cpu|cuda] [--size 64] ...

Subject: an untrained deepinv U-Net (~1.2 M parameters, residual) on the adjoint of single-coil
MRI ×4 (random lines), Ψ(y) = UNet(A* y), on Shepp–Logan phantoms. Prints

(a) time(one search step) / time(one bare forward + backward w.r.t. the input), same batch
    (images × restarts): the search's own overhead per step (target ≤ 1.15);
(b) a reference loop in the style of robust-nets' find_adversarial.py (restarts one after
    another, every level from scratch, a fixed number of Adam steps, projection onto the ball)
    against workers.engine.attacks (restarts and images in one batch, warm start across levels,
    early stopping): ratio of wall times and of the worst relative errors found.

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import resize

from schemas.model_spec import ModelSpec
from schemas.operators import MRIOperator
from workers.engine.attacks import SearchSettings, per_sample_norm, worst_case_search
from workers.engine.context import Operator, PassCounter, Subject
from workers.engine.datasets import random_ellipses
from workers.engine.models import load_model
from workers.engine.operators import build_operator
from workers.engine.subjects import model_subject


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    parser.add_argument(
        "--our-steps",
        type=int,
        default=None,
        help="step budget of our search in (b) (default: --steps, the reference loop's)",
    )
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--model",
        choices=["reference", "untrained"],
        default="reference",
        help="the trained reference U-Net of examples/reference (64×64, real images), or a "
        "seeded untrained U-Net of any --size (complex images)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.model == "reference":
        operator, subject, images, parameters = _reference_setup(args.images, device)
        args.size = images.shape[-1]
    else:
        operator, subject, images, parameters = _setup(args.size, args.images, device)
    y = operator.A(images)
    print(
        f"torch {torch.__version__}, device {_describe(device)}, {torch.get_num_threads()} threads"
    )
    print(
        f"U-Net ({args.model}) {parameters:,} parameters, images "
        f"{'×'.join(str(n) for n in images.shape)}, restarts {args.restarts}"
    )

    bare, step, with_setup = _per_step_times(subject, operator, y, images, args, device)
    print(
        f"(a) per step: bare forward+backward {bare * 1e3:.1f} ms, "
        f"search step {step * 1e3:.1f} ms, ratio {step / bare:.3f} (target ≤ 1.15); "
        f"set-up included {with_setup * 1e3:.1f} ms, ratio {with_setup / bare:.3f}"
    )

    reference_time, reference_errors = _timed(
        device, lambda: _reference_search(subject, operator, y, images, args)
    )
    ours_time, (ours_errors, steps_run) = _timed(
        device, lambda: _our_search(subject, operator, y, images, args)
    )
    print("(b) level  reference max err  ours max err  (ours steps run)")
    for level, ref, ours, steps in zip(
        args.levels, reference_errors, ours_errors, steps_run, strict=True
    ):
        print(f"    {level:<6} {ref:17.4f} {ours:13.4f}  ({steps}/{args.our_steps or args.steps})")
    error_ratio = float(np.mean(np.array(ours_errors) / np.array(reference_errors)))
    print(
        f"    wall time: reference {reference_time:.1f} s, ours {ours_time:.1f} s, "
        f"ratio {ours_time / reference_time:.2f} (goal ≤ 0.5); "
        f"error ratio ours/reference {error_ratio:.3f} (goal ≥ 1)"
    )


class _AdjointUNet(torch.nn.Module):
    """Ψ(y) = A* y + g · UNet(A* y): a post-processing network. Untrained (seeded weights): the
    small gain g keeps it near zero filling, so the errors the searches find mean something."""

    def __init__(self, operator: Operator, net: torch.nn.Module, gain: float = 0.1) -> None:
        super().__init__()
        self.operator = operator
        self.net = net
        self.gain = gain

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        zero_filled = self.operator.A_adjoint(y)
        return zero_filled + self.gain * self.net(zero_filled)


REFERENCE = Path(__file__).resolve().parent.parent / "examples" / "reference"


def _reference_setup(
    count: int, device: torch.device
) -> tuple[Operator, Subject, torch.Tensor, int]:
    """The shipped reference network on fresh ellipse phantoms, through the engine's own loader
    and input convention: a trained network, so the errors the searches find differ."""
    spec = ModelSpec.model_validate_json((REFERENCE / "spec.json").read_text())
    audit = json.loads((REFERENCE / "audit.json").read_text())
    mri = MRIOperator.model_validate(audit["operator"])
    operator = build_operator(mri, spec.image_shape, device)
    model = load_model(REFERENCE / "model.safetensors", "safetensors", spec, device)
    subject = model_subject(model, spec, operator, PassCounter())
    images = random_ellipses(count, spec.image_shape[1], seed=0).to(device)
    return operator, subject, images, sum(p.numel() for p in model.parameters())


def _setup(
    size: int, count: int, device: torch.device
) -> tuple[Operator, Subject, torch.Tensor, int]:
    import deepinv

    operator = build_operator(
        MRIOperator(mask="random_lines", acceleration=4, center_fraction=0.08),
        (2, size, size),
        device,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = deepinv.models.UNet(
            in_channels=2,
            out_channels=2,
            scales=4,
            channels_per_scale=[24, 48, 96, 192],
            batch_norm=False,
            residual=False,
        )
    model = _AdjointUNet(operator, net).to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    base = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True).astype(np.float32)
    variants = [np.rot90(base, k) if k < 4 else np.fliplr(np.rot90(base, k)) for k in range(count)]
    real = torch.from_numpy(np.stack([v.copy() for v in variants]))[:, None]
    images = torch.cat([real, torch.zeros_like(real)], dim=1).to(device)  # complex, imaginary 0
    parameters = sum(p.numel() for p in net.parameters())
    return operator, Subject("model", model.forward), images, parameters


def _per_step_times(
    subject: Subject,
    operator: Operator,
    y: torch.Tensor,
    images: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[float, float, float]:
    """Seconds per bare forward+backward, per search step (marginal) and per search step with
    the level's set-up included, on the same batch."""
    y_all = y.repeat(args.restarts, 1, 1, 1)
    target = images.repeat(args.restarts, 1, 1, 1)
    v = 0.01 * operator.project(torch.randn_like(y_all))

    def bare() -> None:
        for _ in range(args.timing_steps):
            point = v.detach().requires_grad_(True)
            loss = (subject.reconstruct(y_all + point) - target).pow(2).sum()
            torch.autograd.grad(loss, point)

    def search(steps: int) -> Callable[[], None]:
        settings = SearchSettings(steps=steps, restarts=args.restarts, early_stop_tolerance=0.0)

        def run() -> None:
            worst_case_search(subject, operator, y, images, [0.02], settings, range(len(images)))

        return run

    bare()  # warm-up (allocator, kernels)
    search(args.timing_steps)()
    bare_time = min(_timed(device, bare)[0] for _ in range(3))
    # one step's marginal cost: T(2N steps) − T(N steps), so the one-off set-up of a level
    # (random starts drawn per image on the CPU, picking the worst restart) is not counted
    short = min(_timed(device, search(args.timing_steps))[0] for _ in range(3))
    long = min(_timed(device, search(2 * args.timing_steps))[0] for _ in range(3))
    marginal = (long - short) / args.timing_steps
    # on a busy CPU the difference is noisy: also give the upper bound with set-up included
    return bare_time / args.timing_steps, marginal, long / (2 * args.timing_steps)


def _reference_search(
    subject: Subject,
    operator: Operator,
    y: torch.Tensor,
    images: torch.Tensor,
    args: argparse.Namespace,
) -> list[float]:
    """robust-nets style: restarts one after another, fixed steps, no warm start, Adam."""
    generator = torch.Generator().manual_seed(1)
    y_norm = operator.norm(y)
    measured = float(operator.project(torch.ones_like(y[:1])).sum())
    worst_errors = []
    for level in args.levels:
        radius = (level * y_norm).view(-1, 1, 1, 1)
        best_error = torch.zeros(len(images), device=y.device)
        for _ in range(args.restarts):
            start = operator.project(torch.randn(y.shape, generator=generator).to(y.device))
            e = (start / operator.norm(start).view(-1, 1, 1, 1) * radius * 0.5).requires_grad_(True)
            # Adam moves every entry by about lr: lr = step length / √(measured entries)
            lr = 0.1 * float(radius.mean()) / measured**0.5
            optimizer = torch.optim.Adam([e], lr=lr)
            for _ in range(args.steps):
                optimizer.zero_grad()
                loss = -(subject.reconstruct(y + e) - images).pow(2).sum()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    e.copy_(operator.project(e))
                    e.mul_((radius.flatten() / operator.norm(e)).clamp(max=1).view(-1, 1, 1, 1))
            with torch.no_grad():
                error = per_sample_norm(subject.reconstruct(y + e) - images) / per_sample_norm(
                    images
                )
                best_error = torch.maximum(best_error, error)
        worst_errors.append(float(best_error.max()))
    return worst_errors


def _our_search(
    subject: Subject,
    operator: Operator,
    y: torch.Tensor,
    images: torch.Tensor,
    args: argparse.Namespace,
) -> tuple[list[float], list[int]]:
    settings = SearchSettings(
        steps=args.our_steps or args.steps,
        restarts=args.restarts,
        step_size=0.1,
        early_stop_tolerance=1e-3,
        check_every=max(1, min(10, (args.our_steps or args.steps) // 5)),
    )
    outcomes = worst_case_search(
        subject, operator, y, images, args.levels, settings, range(len(images))
    )
    errors = []
    with torch.no_grad():
        for outcome in outcomes:
            attacked = subject.reconstruct(y + outcome.perturbation)
            error = per_sample_norm(attacked - images) / per_sample_norm(images)
            errors.append(float(error.max()))
    return errors, [outcome.steps for outcome in outcomes]


def _timed(device: torch.device, work: Callable[[], object]) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


if __name__ == "__main__":
    main()
