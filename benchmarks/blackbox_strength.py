"""How strong the query-only searches are next to the white-box ones, on endpoints that wrap
known models (issue 24, "Strength").

    .venv/bin/python benchmarks/blackbox_strength.py [--cases linear unet classifier]
        [--images 1] [--levels 0.01 0.02 0.05] [--steps 100] [--threads 2]
        [--classifier-images 16] [--classifier-norms linf l2]

Each model is served by the project's own Open Inference Protocol server
(tests/fixtures/oip_server.py) on loopback; the query-only search
(workers.engine.query_search, DEFAULT budget unless --steps/--directions say otherwise) runs
through the real client (InferenceClient, every query over HTTP, counted in its ledger) and
EndpointModule, the white-box default search (workers.engine.attacks.worst_case_search with
WorstCaseCheck() defaults) on the same model in process, on the same images, operator and
levels, with the target `reconstruction` (the default check's but for the target).
Both searches' perturbations are scored on the local model: the error
‖Ψ(y + e) − Ψ(y)‖ (the default target, the reconstruction), per image and level. Cases:

- `linear`: Ψ = W on 16×16 images (denoising, image space), W of known singular values
  (3, 1, 0.5): the exact worst error is δ‖y‖·σ_max, printed beside both;
- `unet`: the trained reference U-Net of examples/reference (64×64, MRI ×4 cartesian, input
  A*y), fresh ellipse phantoms; the endpoint serves the network, the engine applies A* (as an
  audit of an `adjoint` endpoint model does);
- `classifier`: the reference classifier of examples/classifier (28×28 digits) and its own
  check, `adversarial` (robust accuracy per ε): the query-only attack an endpoint classifier
  gets (workers.engine.classifier_attacks.run_query_only: AutoAttack's Square under ℓ∞, the
  finite-difference Jacobian attack then Square under ℓ2; default budget of 5000 queries per
  image and ε) through the real client and EndpointModule, against the
  white-box standard AutoAttack (`attack: autoattack`) in process, on the same digits
  (`--classifier-images`, seed 0), ε (CLASSIFIER_EPSILONS, per norm) and seed.

Prints per case and level: white-box found, query-only found, their ratio (goal ≥ 0.9), the
queries the query-only search sent (the ledger) and both wall times; for the classifier, the
robust accuracies and the images each attack broke, the ratio being query-only broken over
white-box broken. Exit status 1 if a ratio is below --goal. Results are recorded in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(ROOT))

from schemas.callback_targets import parse_allow_list  # noqa: E402
from schemas.checks import WorstCaseCheck  # noqa: E402
from schemas.checks_classifier import AdversarialCheck  # noqa: E402
from schemas.endpoints import EndpointLimits, EndpointTarget  # noqa: E402
from schemas.model_spec import ModelSpec  # noqa: E402
from schemas.operators import DenoisingOperator, MRIOperator  # noqa: E402
from tests.fixtures.oip_server import LinearModel, OIPServer  # noqa: E402
from workers.engine.attacks import (  # noqa: E402
    SearchSettings,
    ThreatModel,
    per_sample_norm,
    worst_case_search,
)
from workers.engine.checks.adversarial import Adversarial  # noqa: E402
from workers.engine.classifier_attacks import SQUARE_QUERIES  # noqa: E402
from workers.engine.classifiers import classifier_subject  # noqa: E402
from workers.engine.context import AuditContext, Operator, PassCounter, Subject  # noqa: E402
from workers.engine.digits import digits  # noqa: E402
from workers.engine.endpoint_model import EndpointModule  # noqa: E402
from workers.engine.ground_truth import random_ellipses  # noqa: E402
from workers.engine.model_loading import load_model  # noqa: E402
from workers.engine.operators import build_operator  # noqa: E402
from workers.engine.query_search import QuerySearchSettings, query_worst_case_search  # noqa: E402
from workers.engine.subjects import model_subject  # noqa: E402
from workers.shared.inference_protocol import InferenceClient  # noqa: E402
from workers.shared.query_ledger import QueryLedger  # noqa: E402

# the benchmark's endpoint is on loopback: generous limits, so that the HTTP round trips (not
# the limits) set the pace; the query count does not depend on them
LIMITS = EndpointLimits(requests_per_second=1000, concurrency=2, max_batch=256)


@dataclass
class Case:
    name: str
    module: torch.nn.Module  # the network the endpoint serves (input → output)
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    operator: Operator
    images: torch.Tensor
    subject: Callable[[torch.nn.Module, PassCounter], Subject]  # Ψ(y) around a network
    exact: Callable[[float, torch.Tensor], torch.Tensor] | None = None  # level, y → worst error


class _Served:
    """A torch module as the OIP server's numpy model (no gradients, float32)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(batch))).numpy()


class _Linear(torch.nn.Module):
    def __init__(self, matrix: np.ndarray, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(
            torch.tensor(matrix, dtype=torch.float32), requires_grad=False
        )
        self.shape = shape

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (y.flatten(1) @ self.weights.T).view(-1, *self.shape)


def _counted(network: torch.nn.Module, counter: PassCounter) -> Subject:
    """Ψ = the network on its input as it is (the image-space linear model)."""

    def reconstruct(y: torch.Tensor) -> torch.Tensor:
        counter.forward += y.shape[0]
        return network(y)

    return Subject(name="model", reconstruct=reconstruct, counter=counter)


def linear_case(images: int) -> Case:
    shape = (1, 16, 16)
    linear = LinearModel(shape, shape, [3.0, 1.0, 0.5], seed=3)
    operator = build_operator(DenoisingOperator(), shape)
    x = torch.rand(images, *shape, generator=torch.Generator().manual_seed(0))
    sigma = linear.sigma_max
    return Case(
        "linear Ψ (16×16, σ_max 3)",
        _Linear(linear.matrix, shape).eval(),
        shape,
        shape,
        operator,
        x,
        _counted,
        exact=lambda level, y: level * per_sample_norm(y) * sigma,
    )


def unet_case(images: int) -> Case:
    reference = ROOT / "examples" / "reference"
    spec = ModelSpec.model_validate_json((reference / "spec.json").read_text())
    audit = json.loads((reference / "audit.json").read_text())
    operator = build_operator(MRIOperator.model_validate(audit["operator"]), spec.image_shape)
    network = load_model(reference / "model.safetensors", "safetensors", spec)
    x = random_ellipses(images, spec.image_shape[1], seed=0)
    shape = tuple(spec.image_shape)
    return Case(
        "reference U-Net (64×64, MRI ×4)",
        network,
        shape,
        shape,
        operator,
        x,
        lambda net, counter: model_subject(net, spec, operator, counter),
    )


CASES = {"linear": linear_case, "unet": unet_case}
# The classifier's epsilons per norm (unit-box units: the reference classifier's value range is
# [0, 1]): where the white-box AutoAttack breaks some but not all of the digits.
CLASSIFIER_EPSILONS = {"linf": [0.02, 0.03], "l2": [0.5, 0.75]}
CLASSIFIER_SEED = 3


def _errors(
    subject: Subject, y: torch.Tensor, outcomes: list, clean: torch.Tensor
) -> dict[float, torch.Tensor]:
    with torch.no_grad():
        return {
            o.level: per_sample_norm(subject.reconstruct(y + o.perturbation) - clean)
            for o in outcomes
        }


def run_case(case: Case, levels: list[float], settings: QuerySearchSettings) -> list[float]:
    # the default check but for the target: the error against the clean reconstruction, which
    # has an exact answer on the linear case and is the only one the classifier's logits have
    check = WorstCaseCheck(levels=sorted(set(levels)), target="reconstruction")
    threat = ThreatModel.from_check(check.threat_model())
    white = SearchSettings.from_check(check.search_settings())
    x = case.images
    y = case.operator.A(x)
    seeds = list(range(len(x)))
    local = case.subject(case.module, PassCounter())
    with torch.no_grad():
        clean = local.reconstruct(y)

    start = time.perf_counter()
    white_outcomes = worst_case_search(local, case.operator, y, x, threat, white, seeds)
    white_time = time.perf_counter() - start
    white_found = _errors(local, y, white_outcomes, clean)

    ledger = QueryLedger()
    served = OIPServer(_Served(case.module), case.input_shape, case.output_shape)
    with served:
        target = EndpointTarget(url=served.url, model_name=served.name)
        client = InferenceClient(
            target, limits=LIMITS, allow=parse_allow_list("127.0.0.1"), ledger=ledger
        )
        with client:
            module = EndpointModule(client, case.output_shape)
            remote = case.subject(module, PassCounter())
            start = time.perf_counter()
            with module.scope("worst_case"):
                query_outcomes = query_worst_case_search(
                    remote, case.operator, y, x, threat, settings, seeds
                )
            query_time = time.perf_counter() - start
    sent = ledger.sent
    planned = len(x) * (1 + len(set(levels)) * settings.queries_per_level())
    query_found = _errors(local, y, query_outcomes, clean)

    print(
        f"{case.name}: {len(x)} image(s); white-box default (pgd, {white.steps} steps, "
        f"{white.restarts} restarts) {white_time:.1f} s; query-only ({settings.steps} steps, "
        f"{settings.restarts} restarts, {settings.directions} direction pairs) "
        f"{query_time:.1f} s, {sent:,} queries sent (planned {planned:,}: per image the clean "
        f"answer and {settings.queries_per_level():,} per level)"
    )
    print("    level    white-box found   query-only found   ratio (min per image)   exact")
    ratios = []
    for level in levels:
        ours, theirs = query_found[level], white_found[level]
        ratio = ours / theirs.clamp_min(1e-12)
        ratios.append(float(ratio.min()))
        exact = "" if case.exact is None else f"{float(case.exact(level, y).mean()):.5g}"
        print(
            f"    {level:<7}  {float(theirs.mean()):<16.5g}  {float(ours.mean()):<17.5g}  "
            f"{float(ratio.mean()):.4f} ({float(ratio.min()):.4f})        {exact}"
        )
    return ratios


def run_classifier(images: int, norms: list[str]) -> list[float]:
    """The `adversarial` check on the reference classifier: query-only (Square through the
    endpoint) against the white-box standard AutoAttack; per ε the ratio of the images each
    broke (1 where neither broke any)."""
    reference = ROOT / "examples" / "classifier"
    spec = ModelSpec.model_validate_json((reference / "spec.json").read_text())
    network = load_model(reference / "model.safetensors", "safetensors", spec)
    shape = (spec.image_shape[0], spec.image_shape[1], spec.image_shape[2])
    classes = int(spec.num_classes or 10)
    x, labels = digits(images, shape[-1], seed=0)
    ctx = AuditContext(
        operator=build_operator(DenoisingOperator(), shape),
        images=x,
        device=torch.device("cpu"),
        seed=0,
        noise_level=0.0,
        labels=labels,
    )
    kind = Adversarial()
    rows = range(len(x))
    ratios = []
    for norm in norms:
        epsilons = CLASSIFIER_EPSILONS[norm]
        white_check = AdversarialCheck(norm=norm, epsilons=epsilons, attack="autoattack")
        start = time.perf_counter()
        subject = classifier_subject(network, spec, PassCounter())
        white = kind.merge(
            white_check, [kind.run(white_check, ctx, subject, rows, CLASSIFIER_SEED)]
        )
        white_time = time.perf_counter() - start

        check = AdversarialCheck(norm=norm, epsilons=epsilons)
        ledger = QueryLedger()
        served = OIPServer(_Served(network), shape, (classes,))
        with served:
            target = EndpointTarget(url=served.url, model_name=served.name)
            client = InferenceClient(
                target, limits=LIMITS, allow=parse_allow_list("127.0.0.1"), ledger=ledger
            )
            with client:
                module = EndpointModule(client, (classes,))
                subject = classifier_subject(module, spec, PassCounter())
                start = time.perf_counter()
                query = kind.merge(check, [kind.run(check, ctx, subject, rows, CLASSIFIER_SEED)])
                query_time = time.perf_counter() - start
        correct = round(white["clean_accuracy"] * len(x))
        print(
            f"reference classifier (28×28 digits, adversarial {norm}): {len(x)} digits, "
            f"{correct} classified correctly; white-box AutoAttack (standard) {white_time:.1f} s; "
            f"query-only {query['attack']} ({SQUARE_QUERIES} queries per image and ε at most) "
            f"{query_time:.1f} s, {ledger.sent:,} queries sent"
        )
        print("    ε        white-box robust (broken)   query-only robust (broken)   ratio")
        for theirs, ours in zip(white["levels"], query["levels"], strict=True):
            broken_white, broken_query = correct - theirs["robust"], correct - ours["robust"]
            ratio = broken_query / broken_white if broken_white else 1.0
            ratios.append(ratio)
            print(
                f"    {theirs['epsilon']:<7}  {theirs['robust_accuracy']:<6.4f} ({broken_white})"
                f"{'':<15}{ours['robust_accuracy']:<6.4f} ({broken_query}){'':<16}{ratio:.4f}"
            )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [*CASES, "classifier"]
    parser.add_argument("--cases", nargs="+", choices=sorted(names), default=names)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    parser.add_argument("--steps", type=int, default=None, help="query-only steps per level")
    parser.add_argument("--directions", type=int, default=None, help="direction pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--goal", type=float, default=0.9)
    parser.add_argument("--classifier-images", type=int, default=16)
    parser.add_argument(
        "--classifier-norms", nargs="+", choices=sorted(CLASSIFIER_EPSILONS), default=["linf", "l2"]
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    defaults = QuerySearchSettings()
    settings = QuerySearchSettings(
        steps=args.steps or defaults.steps, directions=args.directions or defaults.directions
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; query-only budget per "
        f"image and level {settings.queries_per_level():,} (default "
        f"{defaults.queries_per_level():,})"
    )
    ratios = [
        min(run_case(CASES[name](args.images), args.levels, settings))
        for name in args.cases
        if name in CASES
    ]
    if "classifier" in args.cases:
        ratios.append(min(run_classifier(args.classifier_images, args.classifier_norms)))
    worst = min(ratios)
    print(f"smallest ratio query-only / white-box: {worst:.4f} (goal ≥ {args.goal})")
    sys.exit(0 if worst >= args.goal else 1)


if __name__ == "__main__":
    main()
