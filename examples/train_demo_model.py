"""Train the bundled demo model: a small post-processing U-Net for MRI (input: the adjoint A*y),
cartesian mask, acceleration 4, on seeded random ellipses. Reproducible:

    .venv/bin/python examples/train_demo_model.py

writes examples/demo/model.safetensors and examples/demo/loss.json. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from schemas.datasets import BuiltinDataset
from schemas.model_spec import ModelSpec
from schemas.operators import MRIOperator
from workers.engine.architectures import build_architecture
from workers.engine.datasets import load_images
from workers.engine.operators import build_operator

HERE = Path(__file__).resolve().parent / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    spec = ModelSpec.model_validate(json.loads((HERE / "spec.json").read_text()))
    audit = json.loads((HERE / "audit.json").read_text())
    operator = build_operator(MRIOperator.model_validate(audit["operator"]), spec.image_shape)
    model = build_architecture(spec.architecture, spec)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    size = spec.image_shape[1]

    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        # fresh phantoms every step; seeds far from the audit's so the audit set is unseen
        x = load_images(
            BuiltinDataset(builtin="ellipses", count=args.batch, size=size, seed=10_000 + step)
        )
        x_hat = model(operator.A_adjoint(operator.A(x)))
        loss = torch.nn.functional.mse_loss(x_hat, x)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.5f}  {time.perf_counter() - start:6.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "model.safetensors"), metadata={"seed": str(args.seed)})
    (args.out / "loss.json").write_text(
        json.dumps({"seed": args.seed, "steps": args.steps, "batch": args.batch, "mse": losses})
    )
    print(f"wrote {args.out / 'model.safetensors'}")


if __name__ == "__main__":
    main()
