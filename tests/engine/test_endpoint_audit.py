"""An endpoint model audited end to end in-process (workers.engine.endpoint_model): the engine
loads format `endpoint` as the installed query client's module, runs the query-only checks
(worst_case by the query-only search, random_noise and false_negative by forward passes) and
charges every query to its check and level; the other checks are refused.

The fake client wraps a linear Ψ = W of known singular values in-process. W is the identity on
the span of the audited images (so Ψ(y) = x exactly, with the identity operator and no noise)
and has its largest singular value σ_max off it: the exact worst case of every default
worst_case level δ is ‖Ψ(y + e) − x‖ = ‖We‖ = σ_max·δ‖y‖."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from schemas.audits import AuditConfig
from schemas.endpoints import QUERY_ONLY_CHECKS
from schemas.model_spec import ModelSpec
from tests.engine.tiny_models import Linear
from tests.fixtures.in_process_endpoint import InProcessClient
from workers.engine import entry_points
from workers.engine.audit_probe import probe_for_audit
from workers.engine.checks.worst_case import query_settings
from workers.engine.endpoint_model import EndpointModule, install_query_client
from workers.engine.model_loading import load_model
from workers.engine.report import canonical_json
from workers.shared.errors import EngineInputError

SIDE = 8
SHAPE = (1, SIDE, SIDE)
WORST_CASE_LEVELS = (0.01, 0.02, 0.05)  # WorstCaseCheck's default levels
RANDOM_NOISE_LEVELS = (0.01, 0.02, 0.05)  # RandomNoiseCheck's
SHA = "e" * 64


def known_map(images: np.ndarray, sigma_max: float, spectrum: str, seed: int) -> np.ndarray:
    """W, symmetric: the identity on the span of the images, σ_max on one direction orthogonal
    to it, and below σ_max on the rest (`gap`: 0.5; `smooth`: geometric from 0.9·σ_max)."""
    n = images[0].size
    flat = images.reshape(len(images), n).T.astype(np.float64)
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.concatenate([flat, rng.standard_normal((n, n))], axis=1))
    k = len(images)
    rest = n - k - 1
    tail = np.full(rest, 0.5) if spectrum == "gap" else np.geomspace(0.9 * sigma_max, 0.05, rest)
    values = np.concatenate([np.ones(k), [sigma_max], tail])
    return (basis * values) @ basis.T


def write_images(base_dir: Path, count: int, seed: int) -> np.ndarray:
    images = np.random.default_rng(seed).uniform(0.2, 0.8, (count, *SHAPE)).astype(np.float32)
    np.save(base_dir / "images.npy", images)
    return images


def model_spec() -> ModelSpec:
    return ModelSpec.model_validate(
        {"name": "vendor", "task": "reconstruction", "input": "image", "image_shape": SHAPE}
    )


def audit_config(checks: list[dict[str, Any]], **fields: Any) -> AuditConfig:
    return AuditConfig.model_validate(
        {
            "dataset": {"file": "images.npy"},
            "operator": {"kind": "denoising"},
            "checks": checks,
            "device": "cpu",
            **fields,
        }
    )


@pytest.fixture
def installed() -> Iterator[list[InProcessClient]]:
    """Install a fake client for the test (append it to the list), none afterwards."""
    clients: list[InProcessClient] = []
    yield clients
    install_query_client(None)


def use(clients: list[InProcessClient], client: InProcessClient) -> InProcessClient:
    install_query_client(client)
    clients.append(client)
    return client


def audit(
    base_dir: Path,
    fmt: str,
    config: AuditConfig,
    out: str,
    model_file: Path | None = None,
    **kw: Any,
) -> dict[str, Any]:
    return entry_points.run_audit(
        model_file or base_dir / "endpoint.json",
        fmt,  # type: ignore[arg-type]
        model_spec(),
        config,
        out_dir=base_dir / out,
        model_sha256=SHA,
        base_dir=base_dir,
        **kw,
    )


def reached(record: dict[str, Any], sigma_max: float) -> dict[tuple[int, float], float]:
    """Per image and level of a worst_case shard: ‖We‖ / (σ_max·δ‖y‖), from the figures
    ‖Ψ(y+e) − Ψ(y)‖/‖e‖ and ‖e‖/‖y‖."""
    return {
        (image["index"], row["level"]): row["lipschitz_lower_bound"]
        * row["relative_perturbation"]
        / (sigma_max * row["level"])
        for image in record["result"]["images"]
        for row in image["levels"]
    }


def worst_case_records(base_dir: Path, fmt: str, config: AuditConfig, out: str, **kw: Any) -> Any:
    records: dict[str, dict[str, Any]] = {}
    report = audit(base_dir, fmt, config, out, on_shard=lambda s, r: records.update({s: r}), **kw)
    worst = [r for s, r in records.items() if r["kind"] == "worst_case"]
    return report, worst


CHECKS = [{"kind": "worst_case"}, {"kind": "random_noise"}, {"kind": "false_negative"}]


@pytest.mark.parametrize(
    ("count", "sigma_max", "spectrum", "seed"), [(3, 3.0, "gap", 0), (2, 2.0, "smooth", 1)]
)
def test_a_query_only_audit_finds_the_known_worst_case(
    tmp_path: Path,
    installed: list[InProcessClient],
    count: int,
    sigma_max: float,
    spectrum: str,
    seed: int,
) -> None:
    """worst_case + random_noise + false_negative at their defaults through the endpoint: the
    query-only search reaches 0.9 of σ_max·δ‖y‖ and of what the white-box search finds on the
    same model loaded from a file; the forward-only checks agree with the white-box run; every
    query is charged to its check and level."""
    images = write_images(tmp_path, count, seed)
    matrix = torch.tensor(known_map(images, sigma_max, spectrum, seed), dtype=torch.float32)
    model = Linear(matrix, SHAPE)
    client = use(installed, InProcessClient(model))
    config = audit_config(CHECKS)
    report, query_worst = worst_case_records(tmp_path, "endpoint", config, "endpoint")

    scripted = tmp_path / "model.pt"
    torch.jit.script(model).save(str(scripted))
    white_report, white_worst = worst_case_records(
        tmp_path, "torchscript", config, "white", model_file=scripted
    )

    found = {k: v for record in query_worst for k, v in reached(record, sigma_max).items()}
    white = {k: v for record in white_worst for k, v in reached(record, sigma_max).items()}
    assert sorted(found) == sorted(white) and len(found) == count * len(WORST_CASE_LEVELS)
    for key, value in found.items():
        assert value >= 0.9, (key, value)
        assert value >= 0.9 * white[key], (key, value, white[key])
        assert value <= 1 + 1e-4  # nothing beats the exact answer
    ratios = [found[k] / white[k] for k in sorted(found)]
    print(f"{spectrum}: query/exact min {min(found.values()):.4f}, query/white-box {ratios}")

    # the report says which search ran; the white-box report is as it always was
    worst_case = report["checks"][0]
    assert worst_case["search"] == "query-only" and worst_case["optimizer"] == "query"
    # 8×8 inputs: 64 differences a step (fewer entries than 2·65 + 1), and what was sent
    assert worst_case["query_search"]["queries_per_level"] == 1 + 100 * (64 + 1)
    assert all(row["found_by"] == {"query": count} for row in worst_case["levels"])
    assert "search" not in white_report["checks"][0]
    assert white_report["checks"][0]["optimizer"] == "pgd"
    # the forward-only checks measure the same through the endpoint as on the file
    for kind in (1, 2):
        ours, theirs = report["checks"][kind], white_report["checks"][kind]
        assert canonical_json(ours["comparisons"]) == canonical_json(theirs["comparisons"])
    for ours, theirs in zip(
        report["checks"][1]["levels"], white_report["checks"][1]["levels"], strict=True
    ):
        assert ours["relative_error"]["mean"] == pytest.approx(
            theirs["relative_error"]["mean"], rel=1e-5
        )
    assert report["checks"][2]["misses"] == white_report["checks"][2]["misses"]
    assert report["model"]["format"] == "endpoint" and report["model"]["stochastic"] is False

    # every query charged to its check and level, the budget as documented
    per_level = query_settings(config.checks[0]).queries_per_level(SIDE * SIDE)  # type: ignore[arg-type]
    queries = client.queries
    for level in WORST_CASE_LEVELS:  # the search, then Ψ(y + e) and the Gaussian comparison
        assert queries["worst_case", level] == count * (per_level + 2)
    assert queries["worst_case", None] == count  # Ψ(y); the search's target is x itself
    for level in RANDOM_NOISE_LEVELS:
        assert queries["random_noise", level] == count * 20
    assert queries["random_noise", None] == count
    assert queries["false_negative", None] == count * (1 + 8)  # Ψ(y), 8 placements
    assert set(queries) - {("audit", None)} == {
        *(("worst_case", level) for level in (*WORST_CASE_LEVELS, None)),
        *(("random_noise", level) for level in (*RANDOM_NOISE_LEVELS, None)),
        ("false_negative", None),
    }
    # the audit's stochasticity detection, at the probe's input (16 calls of 2 inputs)
    assert queries["audit", None] == 32
    assert sum(queries.values()) == report["cost"]["forward_passes"] + 32


@pytest.mark.parametrize(
    ("check", "named"),
    [
        ({"kind": "lipschitz"}, "lipschitz needs the model's gradients or weights"),
        ({"kind": "kernel"}, "kernel needs the model's gradients or weights"),
        ({"kind": "false_positive"}, "false_positive needs the model's gradients or weights"),
        ({"kind": "false_negative", "search": "adversarial"}, "search 'adversarial'"),
        ({"kind": "worst_case", "formulation": "penalized"}, "formulation 'penalized'"),
        ({"kind": "worst_case", "certify": {}}, "certify needs the model's weights"),
    ],
)
def test_checks_that_need_gradients_are_refused(
    tmp_path: Path, installed: list[InProcessClient], check: dict[str, Any], named: str
) -> None:
    images = write_images(tmp_path, 1, 0)
    client = use(installed, InProcessClient(Linear(torch.eye(images[0].size), SHAPE)))
    config = audit_config([{"kind": "random_noise"}, check])
    with pytest.raises(EngineInputError, match=named) as refused:
        audit(tmp_path, "endpoint", config, "out")
    if "needs the model's gradients or weights" in named:
        assert str(refused.value).endswith(", ".join(sorted(QUERY_ONLY_CHECKS)))
    assert client.queries == Counter()  # refused before any query


def test_a_stochastic_endpoint_is_audited_as_a_sampler(
    tmp_path: Path, installed: list[InProcessClient]
) -> None:
    """An endpoint whose every answer carries fresh noise is detected stochastic: worst_case
    searches and reports its average map, random_noise says it measures single draws."""
    write_images(tmp_path, 1, 2)
    client = use(installed, InProcessClient(Linear(torch.eye(SIDE * SIDE), SHAPE), noise=0.05))
    config = audit_config(
        [
            {"kind": "worst_case", "levels": [0.05], "restarts": 1, "sampler": {"draws": 2}},
            {"kind": "random_noise", "levels": [0.05], "samples": 4},
        ]
    )
    report = audit(tmp_path, "endpoint", config, "out")
    assert report["model"]["stochastic"] is True and report["model"]["output_spread"] > 1e-3
    worst_case, random_noise = report["checks"]
    assert worst_case["search"] == "query-only" and worst_case["sampler"]["draws"] == 2
    assert "standard_error" in worst_case["levels"][0]
    assert "sampler" in random_noise
    assert client.queries["worst_case", 0.05] > 0 and client.queries["random_noise", 0.05] == 4


def test_sharded_runs_merge_into_the_one_run_report(
    tmp_path: Path, installed: list[InProcessClient]
) -> None:
    """Plan, run each shard alone (in reverse, through JSON), merge: the one run's report."""
    images = write_images(tmp_path, 2, 3)
    matrix = torch.tensor(known_map(images, 2.5, "gap", 3), dtype=torch.float32)
    use(installed, InProcessClient(Linear(matrix, SHAPE)))
    config = audit_config(
        [
            {"kind": "worst_case", "levels": [0.02, 0.05]},
            {"kind": "random_noise", "samples": 5},
            {"kind": "false_negative", "placements": 3},
        ],
        budget={"images_per_shard": 1},
    )
    whole = audit(tmp_path, "endpoint", config, "whole")
    plan = entry_points.plan_audit(model_spec(), config, tmp_path)
    assert len(plan) == 3 * 2
    stored: dict[str, dict[str, Any]] = {}
    for shard in reversed(plan):
        ran = audit(
            tmp_path,
            "endpoint",
            config,
            shard["shard_id"],
            only_shards=[shard["shard_id"]],
            on_shard=lambda s, r: stored.update({s: json.loads(json.dumps(r))}),
        )
        assert ran == {"shards": [shard["shard_id"]]}
    merged = audit(tmp_path, "endpoint", config, "merged", completed_shards=stored)
    for report in (whole, merged):
        report["cost"].pop("wall_seconds")
    assert canonical_json(merged) == canonical_json(whole)
    assert whole["checks"][0]["search"] == "query-only"


def test_false_negative_noise_runs_forward_only(
    tmp_path: Path, installed: list[InProcessClient]
) -> None:
    write_images(tmp_path, 1, 4)
    client = use(installed, InProcessClient(Linear(torch.eye(SIDE * SIDE), SHAPE)))
    config = audit_config(
        [{"kind": "false_negative", "search": "noise", "noise_samples": 3, "placements": 2}]
    )
    report = audit(tmp_path, "endpoint", config, "out")
    assert report["checks"][0]["trials"] == 2 * 3
    # Ψ(y + e) per noise draw, then Ψ(y + Az + e) per placement and draw
    assert client.queries["false_negative", None] == 3 + 2 * 3


def test_the_audit_probe_runs_forward_only(
    tmp_path: Path, installed: list[InProcessClient]
) -> None:
    write_images(tmp_path, 1, 0)
    client = use(installed, InProcessClient(Linear(torch.eye(SIDE * SIDE), SHAPE)))
    config = audit_config([{"kind": "random_noise"}])
    facts = probe_for_audit(tmp_path / "endpoint.json", "endpoint", model_spec(), config, tmp_path)
    assert facts["probe"] == "passed" and facts["output_shape"] == [2, *SHAPE]
    assert facts["stochastic"] is False
    assert client.queries == Counter({("probe", None): 4})


def test_loading_an_endpoint_model_needs_an_installed_client(tmp_path: Path) -> None:
    install_query_client(None)
    with pytest.raises(EngineInputError, match="no query client is installed"):
        load_model(tmp_path / "endpoint.json", "endpoint", model_spec())
    classifier = ModelSpec.model_validate(
        {
            "name": "c",
            "task": "classification",
            "input": "image",
            "image_shape": SHAPE,
            "num_classes": 3,
        }
    )
    install_query_client(InProcessClient(torch.nn.Identity()))
    try:
        module = load_model(tmp_path / "missing.json", "endpoint", classifier)
    finally:
        install_query_client(None)
    assert isinstance(module, EndpointModule) and module.query_only
    assert module.output_shape == (3,)
