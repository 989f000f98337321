from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.reports import Report
from tests.engine.tiny_models import Identity, config, spec
from workers.engine.audit import plan_audit, run_audit_with_model
from workers.engine.report import canonical_json
from workers.engine.shards import plan_shards, shard_seed
from workers.shared.errors import AuditCancelled, EngineInputError


class TinyNet(torch.nn.Module):
    """A small nonlinear network with seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 2, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.tanh(self.conv1(x)))


SPEC = spec((2, 16, 16), "adjoint", complex=True)
CONFIG = config(
    operator={"kind": "mri", "mask": "random_lines", "seed": 2},
    noise_level=0.01,
    seed=11,
    budget={"images_per_shard": 1},
    checks=[
        {"kind": "random_noise", "levels": [0.02, 0.1], "samples": 3},
        {"kind": "lipschitz", "iterations": 5},
    ],
)


def run(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    return run_audit_with_model(
        TinyNet(), SPEC, CONFIG, out_dir=tmp_path, model_sha256="ab" * 32, **kwargs
    )


def test_same_seed_gives_byte_identical_checks(tmp_path: Path) -> None:
    first = run(tmp_path / "a")
    second = run(tmp_path / "b")
    assert canonical_json(first["checks"]) == canonical_json(second["checks"])
    assert first["cost"]["forward_passes"] == second["cost"]["forward_passes"] > 0


def test_report_fields_and_file(tmp_path: Path) -> None:
    progress: list[tuple[float, str | None, str | None]] = []
    report = run(tmp_path, on_progress=lambda f, c, m: progress.append((f, c, m)))
    Report.model_validate(report)
    assert (tmp_path / "report.json").read_text(encoding="utf-8") == canonical_json(report)
    assert report["verdict"] == "info"  # no thresholds
    assert [c["kind"] for c in report["checks"]] == ["random_noise", "lipschitz"]
    assert report["config"]["checks"][0]["seed"] == 11  # resolved from the audit seed
    assert report["model"]["sha256"] == "ab" * 32 and report["model"]["name"] == "tiny"
    assert report["environment"]["deterministic_algorithms"] is True
    assert report["environment"]["device"] == "cpu"
    assert report["cost"]["backward_passes"] > 0
    assert progress[-1][0] == 1.0
    assert [p[0] for p in progress] == sorted(p[0] for p in progress)
    # the engine leaves torch's global determinism setting as it found it
    assert not torch.are_deterministic_algorithms_enabled()


def test_resumed_run_gives_the_same_checks(tmp_path: Path) -> None:
    full = run(tmp_path / "full")
    stored: dict[str, dict[str, Any]] = {}

    def keep(shard_id: str, record: dict[str, Any]) -> None:
        stored[shard_id] = json.loads(json.dumps(record))  # as the runner stores it

    with pytest.raises(AuditCancelled):
        run(tmp_path / "part", on_shard=keep, should_stop=lambda: len(stored) >= 4)
    assert len(stored) == 4
    ran: list[str] = []
    resumed = run(
        tmp_path / "resumed", completed_shards=stored, on_shard=lambda s, r: ran.append(s)
    )
    assert canonical_json(resumed["checks"]) == canonical_json(full["checks"])
    assert resumed["cost"]["forward_passes"] == full["cost"]["forward_passes"]
    assert not set(ran) & set(stored) and len(ran) == 6 - 4


def test_shard_plan_and_seeds() -> None:
    shards = plan_shards(CONFIG, 3, ["model", "baseline"])
    assert [s.shard_id for s in shards[:3]] == [
        "c00-random_noise-model-i00000-00001",
        "c00-random_noise-model-i00001-00002",
        "c00-random_noise-model-i00002-00003",
    ]
    assert len(shards) == 2 * 2 * 3
    assert shard_seed(1, None, "x") == shard_seed(1, 1, "x") != shard_seed(1, 2, "x")
    assert 0 <= shard_seed(5, None, "x") < 2**63


def test_baseline_subject_runs_beside_the_model(tmp_path: Path) -> None:
    cfg = config(
        baseline={"kind": "tv"},
        checks=[{"kind": "random_noise", "levels": [0.1], "samples": 2}],
    )

    def builder(baseline_config: Any, operator: Any) -> Any:
        return lambda y: operator.A_adjoint(y)

    report = run_audit_with_model(
        Identity(),
        spec((1, 16, 16), "image"),
        cfg,
        out_dir=tmp_path,
        model_sha256="0" * 64,
        baseline_builder=builder,
    )
    assert [c["subject"] for c in report["checks"]] == ["model", "baseline"]
    # both are the identity here: the same numbers
    assert report["checks"][0]["levels"] == report["checks"][1]["levels"]


def test_mismatched_inputs_raise_engine_input_error(tmp_path: Path) -> None:
    cfg = config(operator={"kind": "gaussian", "m": 10})
    with pytest.raises(EngineInputError, match="input 'image'"):
        run_audit_with_model(
            Identity(), spec((1, 16, 16), "image"), cfg, out_dir=tmp_path, model_sha256="0" * 64
        )


def _without_run_fields(report: dict[str, Any]) -> str:
    """The report minus what differs between two runs of the same audit: its compute time."""
    report = json.loads(json.dumps(report))
    report["cost"].pop("wall_seconds")
    return canonical_json(report)


def test_shards_run_one_at_a_time_then_merged_give_the_one_run_report(tmp_path: Path) -> None:
    """What workers do: plan, run each shard alone (as different workers would, in any order,
    each result through JSON as the database stores it), then merge the stored results."""
    whole = run(tmp_path / "whole")
    plan = plan_audit(SPEC, CONFIG, None)
    n_images = CONFIG.dataset.count  # type: ignore[union-attr]
    assert [s.shard_id for s in plan] == [
        s.shard_id for s in plan_shards(CONFIG, n_images, ["model"])
    ]
    stored: dict[str, dict[str, Any]] = {}
    for shard in reversed(plan):
        ran = run(
            tmp_path / shard.shard_id,
            only_shards=[shard.shard_id],
            on_shard=lambda shard_id, record: stored.update(
                {shard_id: json.loads(json.dumps(record))}
            ),
        )
        assert ran == {"shards": [shard.shard_id]}
    assert sorted(stored) == sorted(s.shard_id for s in plan)
    merged = run(tmp_path / "merged", completed_shards=stored)
    assert _without_run_fields(merged) == _without_run_fields(whole)
    # compute time counts every shard's own seconds, not just the merge's
    assert merged["cost"]["wall_seconds"] >= sum(r["wall_seconds"] for r in stored.values())


def test_a_shard_outside_the_plan_is_a_bug_not_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not in this audit's plan"):
        run(tmp_path, only_shards=["c00-random_noise-model-i00099-00100"])
