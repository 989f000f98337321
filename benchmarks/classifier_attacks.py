"""What the classifier attacks cost, next to the network and next to the libraries called directly.

    .venv/bin/python benchmarks/classifier_attacks.py [--images 16] [--epsilon 0.05] ...

Subject: the reference classifier (examples/classifier: `small_cnn`, 28×28 digits) on built-in
digits (seed 0). Prints

(a) time(one attack step) / time(one bare forward + backward w.r.t. the input), same batch
    (images × restarts), for adv-lib's APGD (through workers.engine.classifier_attacks, the
    unit-box wrapper and pass counting included) and for the ℓ2 PGD written here;
(b) the wall time of the standard AutoAttack (pyautoattack, version "standard") run by the
    `adversarial` check against the same AutoAttack called directly on the same model, images,
    ε and seed, and the robust accuracy each reports (they must be equal).

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from pyautoattack import AutoAttack

from schemas.checks_classifier import AdversarialCheck, AdversarialSearch
from schemas.model_spec import ModelSpec
from schemas.operators import DenoisingOperator
from workers.engine.checks.adversarial import Adversarial
from workers.engine.classifier_attacks import NormBall, run_ball_attack
from workers.engine.classifiers import classifier_subject
from workers.engine.context import AuditContext, PassCounter
from workers.engine.digits import digits
from workers.engine.model_loading import load_model
from workers.engine.operators import build_operator

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "classifier"


def _timed(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def step_ratio(
    model: torch.nn.Module,
    spec: ModelSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    restarts: int,
    steps: int,
) -> None:
    subject = classifier_subject(model, spec, PassCounter())
    u = subject.to_unit(x).repeat(restarts, 1, 1, 1)
    labels = y.repeat(restarts)

    def bare() -> None:
        v = u.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(v), labels)
        torch.autograd.grad(loss, v)

    bare_time = _timed(lambda: [bare() for _ in range(steps)], 3) / steps
    for attack, norm in (("apgd", "linf"), ("pgd", "l2")):
        eps = torch.full((len(u),), 0.02 if norm == "linf" else 0.5)
        attack_time = (
            _timed(
                lambda a=attack, n=norm, e=eps: run_ball_attack(
                    subject.box_model,
                    u,
                    labels,
                    NormBall(n, e),
                    AdversarialSearch(attack=a, steps=steps),
                ),
                3,
            )
            / steps
        )
        print(
            f"(a) {attack} {norm}: batch {len(u)}, bare fwd+bwd {bare_time * 1e3:.2f} ms, "
            f"step {attack_time * 1e3:.2f} ms, ratio {attack_time / bare_time:.2f}"
        )


def autoattack_wall(
    model: torch.nn.Module,
    spec: ModelSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    seed: int,
) -> None:
    subject = classifier_subject(model, spec, PassCounter())
    ctx = AuditContext(
        operator=build_operator(DenoisingOperator(), spec.image_shape),
        images=x,
        device=torch.device("cpu"),
        seed=seed,
        noise_level=0.0,
        labels=y,
    )
    check = AdversarialCheck.model_validate({"attack": "autoattack", "epsilons": [epsilon]})
    adversarial = Adversarial()
    start = time.perf_counter()
    result = adversarial.merge(check, [adversarial.run(check, ctx, subject, range(len(x)), seed)])
    ours = time.perf_counter() - start

    start = time.perf_counter()
    attack = AutoAttack(model, norm="Linf", eps=epsilon, seed=seed, version="standard")
    adversarial, _ = attack.run_standard_evaluation(x, y, batch_size=len(x))
    direct = time.perf_counter() - start
    with torch.no_grad():
        robust = int((model(adversarial).argmax(dim=1) == y).sum()) / len(x)
    level = result["levels"][0]
    print(
        f"(b) AutoAttack standard, {len(x)} images, eps {epsilon}: Tightrope {ours:.1f} s "
        f"(robust accuracy {level['robust_accuracy']:.4f}, broken by "
        f"{json.dumps(level['broken_by'])}), pyautoattack directly {direct:.1f} s "
        f"(robust accuracy {robust:.4f}); ratio {ours / direct:.2f}; passes "
        f"{subject.counter.forward} forward, {subject.counter.backward} backward"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = ModelSpec.model_validate(json.loads((EXAMPLE / "spec.json").read_text()))
    model = load_model(EXAMPLE / "model.safetensors", "safetensors", spec, "cpu")
    x, y = digits(args.images, spec.image_shape[1], seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    step_ratio(model, spec, x, y, args.restarts, args.steps)
    autoattack_wall(model, spec, x, y, args.epsilon, args.seed)


if __name__ == "__main__":
    main()
