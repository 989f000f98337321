"""How much the worst-case search costs beyond the network itself, and how strong it is next to
robust-nets' own search.

    .venv/bin/python benchmarks/attack_overhead.py [--device cpu|cuda] [--model reference] ...

Subject (default): the trained reference U-Net of examples/reference on MRI ×4 and fresh
ellipse phantoms; `--model untrained`: a seeded untrained U-Net after the adjoint. Prints

(a) time(one search step) / time(one bare forward + backward w.r.t. the input), same batch
    (images × restarts): the search's own overhead per step (target ≤ 1.15);
(b) per level, robust-nets' search (benchmarks/robust_nets_reference.py: their projected Adam,
    6 restarts of which 3 seed the next level, levels from the largest down, a fixed number
    of iterations) against this project's DEFAULT search (WorstCaseCheck() defaults): both
    relative errors ‖Ψ(y+e) − x‖/‖x‖ (mean and max over images), the ratio ours/theirs, the
    forward and backward passes each used, and the wall times.

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

from schemas.checks import WorstCaseCheck
from schemas.model_spec import ModelSpec
from schemas.operators import MRIOperator
from workers.engine.attacks import (
    SearchSettings,
    ThreatModel,
    per_sample_norm,
    worst_case_search,
)
from workers.engine.context import Operator, PassCounter, Subject
from workers.engine.ground_truth import random_ellipses
from workers.engine.model_loading import load_model
from workers.engine.operators import build_operator
from workers.engine.subjects import model_subject

try:  # imported as benchmarks.attack_overhead (repository root on the path)
    from benchmarks.robust_nets_reference import (
        THEIR_ITERATIONS,
        THEIR_LEVELS,
        robust_nets_search,
    )
except ModuleNotFoundError:  # run as a script: benchmarks/ is the path's first entry
    from robust_nets_reference import (  # type: ignore[no-redef]
        THEIR_ITERATIONS,
        THEIR_LEVELS,
        robust_nets_search,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", type=int, default=64, help="image side (untrained only)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument(
        "--restarts",
        type=int,
        default=None,
        help="(a): restarts in the timed batch (default: the default check's)",
    )
    parser.add_argument("--timing-steps", type=int, default=10, help="(a): steps per timing")
    parser.add_argument(
        "--iterations",
        type=int,
        default=20,
        help="(b): robust-nets' iterations per level (e.g. 20 or 200)",
    )
    parser.add_argument(
        "--their-count",
        action="store_true",
        help=f"(b): robust-nets' real count, {THEIR_ITERATIONS} iterations (overrides "
        "--iterations)",
    )
    parser.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=list(THEIR_LEVELS),
        help="(b): relative levels δ (default: robust-nets' ellipses Fourier table)",
    )
    parser.add_argument("--seed", type=int, default=0, help="(b): robust-nets' random starts")
    parser.add_argument("--skip-overhead", action="store_true", help="do not run (a)")
    parser.add_argument("--skip-comparison", action="store_true", help="do not run (b)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--model",
        choices=["reference", "untrained"],
        default="reference",
        help="the trained reference U-Net of examples/reference (64×64, real images), or a "
        "seeded untrained U-Net of any --size (complex images)",
    )
    args = parser.parse_args()
    if args.their_count:
        args.iterations = THEIR_ITERATIONS
    if args.restarts is None:
        args.restarts = SearchSettings.from_check(WorstCaseCheck().search_settings()).restarts

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
        f"{'×'.join(str(n) for n in images.shape)}"
    )

    if not args.skip_overhead:
        bare, step, with_setup = _per_step_times(subject, operator, y, images, args, device)
        print(
            f"(a) per step, batch {args.images}×{args.restarts} restarts: bare forward+backward "
            f"{bare * 1e3:.1f} ms, search step {step * 1e3:.1f} ms, ratio {step / bare:.3f} "
            f"(target ≤ 1.15); set-up included {with_setup * 1e3:.1f} ms, "
            f"ratio {with_setup / bare:.3f}"
        )
    if not args.skip_comparison:
        _compare(subject, operator, y, images, args, device)


def _compare(
    subject: Subject,
    operator: Operator,
    y: torch.Tensor,
    images: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> None:
    """(b): robust-nets' search against the default search, level by level."""
    levels = list(args.levels)
    theirs_time, theirs = _timed(
        device,
        lambda: robust_nets_search(
            subject, operator, y, images, levels, args.iterations, seed=args.seed
        ),
    )
    check = WorstCaseCheck(levels=sorted(set(levels)))
    threat = ThreatModel.from_check(check.threat_model())
    settings = SearchSettings.from_check(check.search_settings())
    before = (subject.counter.forward, subject.counter.backward)
    ours_time, outcomes = _timed(
        device,
        lambda: worst_case_search(subject, operator, y, images, threat, settings, range(len(y))),
    )
    ours_forward = subject.counter.forward - before[0]
    ours_backward = subject.counter.backward - before[1]
    ours_errors = {}
    ours_steps = {}
    with torch.no_grad():
        x_norm = per_sample_norm(images)
        for outcome in outcomes:
            attacked = subject.reconstruct(y + outcome.perturbation)
            ours_errors[outcome.level] = (per_sample_norm(attacked - images) / x_norm).cpu()
            ours_steps[outcome.level] = outcome.steps

    b = len(images)
    print(
        f"(b) robust-nets: {args.iterations} iterations, 6 restarts (3 carried), "
        f"lr {theirs.lr:.4g}; ours: default check (steps {settings.steps}, restarts "
        f"{settings.restarts}, optimizer {settings.optimizer}); {b} images, seed {args.seed}"
    )
    print(
        "    level   theirs mean/max    ours mean/max   ours/theirs (min per image)   "
        "passes theirs fwd+bwd   ours fwd+bwd (steps)"
    )
    ratios = []
    for k, level in enumerate(levels):
        their = theirs.errors[k]
        forward, backward = theirs.passes_per_level[k]
        if level not in ours_errors:  # the search stopped before this level
            print(f"    {level:<7} {their.mean():.4f}/{their.max():.4f}   (not searched)")
            continue
        ours = ours_errors[level]
        per_image = ours / their.clamp_min(1e-12)
        ratio = float(ours.mean() / their.mean())
        ratios.append(ratio)
        steps = ours_steps[level]
        # the default search's passes at this level: each step is one forward and one backward
        # of every restart of every image
        our_passes = steps * settings.restarts * b
        print(
            f"    {level:<7} {their.mean():.4f}/{their.max():.4f}    "
            f"{ours.mean():.4f}/{ours.max():.4f}    {ratio:6.3f} ({per_image.min():.3f})"
            f"{'':16}{forward:>7}+{backward:<7}      {our_passes:>6}+{our_passes:<6} "
            f"({steps}/{settings.steps})"
        )
    print(
        f"    total passes: robust-nets {theirs.forward} forward + {theirs.backward} backward; "
        f"ours {ours_forward} forward + {ours_backward} backward (subject.counter)"
    )
    print(
        f"    wall time: robust-nets {theirs_time:.1f} s, ours {ours_time:.1f} s, "
        f"ratio {ours_time / theirs_time:.2f}; error ratio ours/theirs, mean over levels "
        f"{float(np.mean(ratios)) if ratios else float('nan'):.3f} (goal ≥ 1), "
        f"min {min(ratios, default=float('nan')):.3f}"
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
    counter = PassCounter()

    def reconstruct(y: torch.Tensor) -> torch.Tensor:
        counter.forward += y.shape[0]  # one forward per sample, as the engine's subjects count
        return model(y)

    return operator, Subject("model", reconstruct, counter), images, parameters


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
        # the default search with a fixed step count (no early stopping), through the check
        check = WorstCaseCheck(
            levels=[0.02], steps=steps, restarts=args.restarts, early_stop_tolerance=0.0
        )
        threat = ThreatModel.from_check(check.threat_model())
        settings = SearchSettings.from_check(check.search_settings())

        def run() -> None:
            worst_case_search(subject, operator, y, images, threat, settings, range(len(images)))

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
