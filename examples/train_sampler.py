"""Train a small noise-conditional denoiser on seeded random ellipses and build from it a
diffusion posterior sampler (deepinv's DiffPIR) for the reference model's operator: 4× cartesian
MRI at 64×64, input A*y. Seeded and reproducible with one command, on the CPU:

    .venv/bin/python examples/train_sampler.py          # a few minutes on 2 CPU cores

writes examples/sampler/{denoiser.safetensors, model.pt, loss.json}. `--export-only` rebuilds
model.pt (TorchScript, traced) from the shipped denoiser weights. Not part of the tests. See
docs/case-study.md, "A sampler beside the U-Net".

The sampler is DiffPIR (Zhu et al., CVPR 2023) as deepinv implements it: its noise schedule, its
data-fidelity prox (deepinv's `L2` on a `DecomposablePhysics`, closed form) and its sampling
step, with two changes made for an audit: gradients flow through it (deepinv's loop runs under
`no_grad`), and it starts from A*y diffused to a moderate noise level rather than from pure noise
(a truncated schedule of STEPS steps, so one draw costs STEPS calls of the small denoiser). Each
call draws fresh Gaussian noise from torch's generator: the traced model records `aten::randn`,
so the file is a sampler, and `torch.manual_seed` makes a draw reproducible.

The operator the sampler sees is the one its input carries: z = A*y = B x with B = A*A, which for
real images is F⁻¹ M F with M the mask symmetrised under k → −k (values 0, ½ and 1). B is
diagonal in the (orthonormal) Fourier basis, so the data-fidelity prox is exact and cheap.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from deepinv.models import DnCNN
from deepinv.optim.data_fidelity import L2
from deepinv.physics import DecomposablePhysics
from deepinv.sampling import DiffPIR
from safetensors.torch import load_file, save_file

from schemas.model_spec import ModelSpec
from schemas.operators import MRIOperator
from workers.engine.ground_truth import random_ellipses
from workers.engine.operators import LinearOperator, build_operator

EXAMPLES = Path(__file__).resolve().parent
REFERENCE = EXAMPLES / "reference"
OUT = EXAMPLES / "sampler"
SIZE = 64
# Training phantoms: seeds no audit (0, 1, …) and no other example's training uses.
POOL_SEED = 3_000_000
VALIDATION_SEED = 3_999_999
CROP = 32  # the denoiser is convolutional: trained on 32×32 crops, run on 64×64 images
LOG_EVERY = 25
# The denoiser: deepinv's DnCNN on (image, noise-level map), few layers and channels.
DEPTH = 5
CHANNELS = 24
# Noise levels (on the [0, 1] image scale) the denoiser is trained on: log-uniform in this range.
SIGMA_RANGE = (0.005, 0.5)
# The sampler: DiffPIR steps, the first timestep of the truncated schedule (its noise level on
# DiffPIR's [−1, 1] scale is about 0.6), the assumed measurement noise, λ and ζ of DiffPIR.
STEPS = 8
T_START = 250
DATA_SIGMA = 0.01
LAMBDA = 7.0
ZETA = 0.5


class NoiseConditionalDenoiser(torch.nn.Module):
    """D(x, σ): deepinv's DnCNN (residual) on the image and a constant map of σ; returns the image
    channel. σ is the noise's standard deviation on the [0, 1] scale."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DnCNN(in_channels=2, out_channels=2, depth=DEPTH, nf=CHANNELS, pretrained=None)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        level = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        level = level.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.net(torch.cat([x, level], dim=1))[:, :1]


def effective_mask(operator: LinearOperator) -> torch.Tensor:
    """M with A*A x = Re F⁻¹(M ⊙ F x) for real images (orthonormal FFT): A*A of a unit impulse,
    transformed."""
    impulse = torch.zeros(1, 1, SIZE, SIZE)
    impulse[..., 0, 0] = 1.0
    response = operator.A_adjoint(operator.A(impulse))
    mask = (torch.fft.fft2(response, norm="ortho") * SIZE).real[0, 0]
    return torch.round(2 * mask) / 2  # 0, ½ or 1, without the FFT's rounding noise


def fourier_physics(mask: torch.Tensor) -> DecomposablePhysics:
    """B = F⁻¹ diag(M) F as deepinv's DecomposablePhysics: V* the orthonormal FFT, V its inverse
    (real part: M is symmetric under k → −k, so V(M ⊙ V* x) is real for real x)."""
    return DecomposablePhysics(
        V_adjoint=lambda x: torch.fft.fft2(x, norm="ortho"),
        V=lambda w: torch.fft.ifft2(w, norm="ortho").real,
        mask=mask,
    )


class DiffPIRSampler(DiffPIR):
    """One posterior draw per call, input z = A*y [B, 1, 64, 64] (see the module docstring)."""

    def __init__(self, denoiser: torch.nn.Module, mask: torch.Tensor) -> None:
        super().__init__(
            model=denoiser, data_fidelity=L2(), sigma=DATA_SIGMA, max_iter=STEPS,
            zeta=ZETA, lambda_=LAMBDA,
        )  # fmt: skip
        self.physics = fourier_physics(mask)
        # the truncated schedule: timesteps T_START … 0, evenly spaced
        self.timesteps = [round(T_START * (1 - k / (STEPS - 1))) for k in range(STEPS)]

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        alpha_bar = self.sqrt_alphas_cumprod**2
        y = torch.fft.fft2(z, norm="ortho")  # = M ⊙ F x: the measurements B carries
        t = self.timesteps[0]
        x = 2 * z - 1
        x = alpha_bar[t].sqrt() * x + (1 - alpha_bar[t]).sqrt() * torch.randn_like(x)
        x0 = x
        for i, t in enumerate(self.timesteps):
            at = alpha_bar[t]
            noise_level = self.reduced_alpha_cumprod[t]  # σ_t on the [−1, 1] scale
            denoised = 2 * self.model(x / (2 * at.sqrt()) + 0.5, noise_level / 2) - 1
            x0 = denoised.clamp(-1, 1)
            gamma = 1.0 / (2 * self.rhos[t])
            x0 = 2 * self.data_fidelity.prox(x0 / 2 + 0.5, y, self.physics, gamma=gamma) - 1
            if i + 1 == len(self.timesteps):
                break
            following = alpha_bar[self.timesteps[i + 1]]
            eps = (x - at.sqrt() * x0) / (1 - at).sqrt()
            x = following.sqrt() * x0 + (1 - following).sqrt() * (
                (1 - self.zeta) ** 0.5 * eps + self.zeta**0.5 * torch.randn_like(x)
            )
        return x0 / 2 + 0.5


def load_reference() -> tuple[ModelSpec, LinearOperator]:
    spec = ModelSpec.model_validate(json.loads((REFERENCE / "spec.json").read_text()))
    audit = json.loads((REFERENCE / "audit.json").read_text())
    operator = build_operator(MRIOperator.model_validate(audit["operator"]), spec.image_shape)
    return spec, operator


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean PSNR over the batch, peak 1 (images in [0, 1])."""
    mse = (x_hat - x).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse)).mean())


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    denoiser = NoiseConditionalDenoiser()
    print(f"{sum(p.numel() for p in denoiser.parameters()):,} parameters")
    pool = random_ellipses(args.pool, SIZE, POOL_SEED)
    validation = random_ellipses(16, SIZE, VALIDATION_SEED)
    generator = torch.Generator().manual_seed(args.seed)
    low, high = (math.log(s) for s in SIGMA_RANGE)
    optimiser = torch.optim.Adam(denoiser.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=args.lr, total_steps=args.steps, pct_start=0.05
    )
    mse_log: list[float] = []
    running = 0.0
    started = time.perf_counter()
    for step in range(args.steps):
        rows = torch.randint(0, len(pool), (args.batch,), generator=generator)
        top, left = torch.randint(0, SIZE - CROP + 1, (2,), generator=generator).tolist()
        x = pool[rows, :, top : top + CROP, left : left + CROP]
        sigma = torch.exp(low + (high - low) * torch.rand(args.batch, generator=generator))
        noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=generator)
        # the loss weighted by 1/σ²-ish balance: relative to the noise (every level counts)
        loss = ((denoiser(noisy, sigma) - x).pow(2).flatten(1).mean(1) / sigma.pow(2)).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        running += loss.item()
        if (step + 1) % LOG_EVERY == 0:
            mse_log.append(running / LOG_EVERY)
            running = 0.0
            print(
                f"step {step + 1:5d}  loss {mse_log[-1]:.4f}  {time.perf_counter() - started:.0f} s"
            )
    wall = time.perf_counter() - started

    denoiser.eval()
    validation_psnr = {}
    with torch.no_grad():
        noise = torch.randn(validation.shape, generator=torch.Generator().manual_seed(1))
        for sigma in (0.02, 0.1, 0.3):
            noisy = validation + sigma * noise
            validation_psnr[str(sigma)] = {
                "noisy": psnr(noisy, validation),
                "denoised": psnr(denoiser(noisy, sigma), validation),
            }
    print(json.dumps(validation_psnr))
    state = {k: v.detach().contiguous() for k, v in denoiser.state_dict().items()}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out / "denoiser.safetensors"), metadata={"seed": str(args.seed)})
    record = {
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "crop": CROP,
        "lr": args.lr,
        "pool": args.pool,
        "pool_seed": POOL_SEED,
        "sigma_range": list(SIGMA_RANGE),
        "denoiser": {"kind": "deepinv DnCNN, noise-conditional", "depth": DEPTH, "nf": CHANNELS},
        "sampler": {
            "kind": "deepinv DiffPIR, truncated schedule, gradients kept",
            "steps": STEPS,
            "t_start": T_START,
            "data_sigma": DATA_SIGMA,
            "lambda": LAMBDA,
            "zeta": ZETA,
        },
        "torch": torch.__version__,
        "wall_seconds": round(wall, 1),
        "log_every": LOG_EVERY,
        "loss": mse_log,
        "validation_psnr": validation_psnr,
    }
    (args.out / "loss.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out / 'denoiser.safetensors'} and loss.json ({wall:.0f} s)")


def build_sampler(out: Path = OUT) -> DiffPIRSampler:
    _, operator = load_reference()
    denoiser = NoiseConditionalDenoiser()
    denoiser.load_state_dict(load_file(str(out / "denoiser.safetensors")), strict=True)
    denoiser.eval()
    for parameter in denoiser.parameters():
        parameter.requires_grad_(False)
    return DiffPIRSampler(denoiser, effective_mask(operator)).eval()


def export(out: Path) -> None:
    """model.pt: the sampler traced on the CPU (aten::randn stays in the graph)."""
    sampler = build_sampler(out)
    example = torch.zeros(1, 1, SIZE, SIZE)
    # check_trace would compare two calls, which differ by design; the traced example input
    # would be stored in the archive, where screening refuses it
    traced = torch.jit.trace(sampler, example, check_trace=False, _store_inputs=False)
    traced.save(str(out / "model.pt"))
    _, operator = load_reference()
    x = random_ellipses(4, SIZE, VALIDATION_SEED)
    z = operator.A_adjoint(operator.A(x))
    loaded = torch.jit.load(str(out / "model.pt"))
    torch.manual_seed(0)
    with torch.no_grad():
        first, second = loaded(z), loaded(z)
        average = torch.stack([loaded(z) for _ in range(8)]).mean(0)
    print(
        f"wrote {out / 'model.pt'}: two draws differ by {float((first - second).abs().max()):.3f}; "
        f"PSNR zero-filled {psnr(z, x):.2f} dB, one draw {psnr(first, x):.2f} dB, "
        f"8-draw average {psnr(average, x):.2f} dB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool", type=int, default=512, help="training phantoms")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not args.export_only:
        train(args)
    export(args.out)


if __name__ == "__main__":
    main()
