"""Train the reference classifier: `small_cnn` (width 16) on the built-in digits, 28×28.
Reproducible (fixed seed, deterministic kernels, CPU):

    .venv/bin/python examples/train_classifier.py

writes examples/classifier/model.safetensors and examples/classifier/loss.json (the
cross-entropy per step, and the accuracy on held-out digits). Not part of the tests. The
training digits use seeds far from the audits' (0 in examples/classifier/audit.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from schemas.model_spec import ModelSpec
from workers.engine.architectures import build_architecture
from workers.engine.digits import digits

HERE = Path(__file__).resolve().parent / "classifier"
TRAIN_SEED, TEST_SEED = 10_001, 10_002


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    spec = ModelSpec.model_validate(json.loads((HERE / "spec.json").read_text()))
    size = spec.image_shape[1]
    x_train, y_train = digits(args.images, size, TRAIN_SEED)
    x_test, y_test = digits(1000, size, TEST_SEED)
    model = build_architecture(spec.architecture, spec)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=args.epochs * (args.images // args.batch)
    )
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(args.images)
        for first in range(0, args.images - args.batch + 1, args.batch):
            batch = order[first : first + args.batch]
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(round(loss.item(), 5))
        accuracy = _accuracy(model, x_test, y_test)
        print(
            f"epoch {epoch}  loss {losses[-1]:.4f}  test accuracy {accuracy:.3f}  "
            f"{time.perf_counter() - start:6.1f} s"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "model.safetensors"), metadata={"seed": str(args.seed)})
    record = {
        "seed": args.seed,
        "train": {"builtin": "digits", "count": args.images, "size": size, "seed": TRAIN_SEED},
        "test": {"builtin": "digits", "count": 1000, "size": size, "seed": TEST_SEED},
        "epochs": args.epochs,
        "batch": args.batch,
        "test_accuracy": _accuracy(model, x_test, y_test),
        "cross_entropy": losses,
    }
    (args.out / "loss.json").write_text(json.dumps(record))
    print(f"wrote {args.out / 'model.safetensors'}")


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(dim=1) == y).float().mean())


if __name__ == "__main__":
    main()
