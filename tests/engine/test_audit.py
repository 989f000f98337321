from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.reports import Report
from tests.engine.tiny_models import Identity, config, spec
from workers.engine.audit import plan_audit, run_audit_with_model, stored_sampling
from workers.engine.probe import DETECTION_CALLS
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


class CountingNet(TinyNet):
    """TinyNet that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def _stored_shards(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Every shard of the audit run alone, stored as the database stores it."""
    stored: dict[str, dict[str, Any]] = {}
    for shard in plan_audit(SPEC, CONFIG, None):
        run(
            tmp_path / shard.shard_id,
            only_shards=[shard.shard_id],
            on_shard=lambda shard_id, record: stored.update(
                {shard_id: json.loads(json.dumps(record))}
            ),
        )
    return stored


def test_the_merge_takes_the_shards_measurement_of_a_deterministic_model(tmp_path: Path) -> None:
    """Each shard's record carries the stochasticity its task measured; the merge of stored
    shards that all found the model deterministic calls it no more, and reports the same."""
    whole = run(tmp_path / "whole")
    stored = _stored_shards(tmp_path)
    assert {json.dumps(r["sampling"]) for r in stored.values()} == {
        json.dumps({"model": {"stochastic": False, "output_spread": 0.0}})
    }
    model = CountingNet()
    merged = run_audit_with_model(
        model, SPEC, CONFIG, out_dir=tmp_path / "m", model_sha256="ab" * 32, completed_shards=stored
    )
    assert model.calls == 0
    assert _without_run_fields(merged) == _without_run_fields(whole)
    # shards stored by a version that did not record it: the merge measures, as before
    older = {k: {f: v for f, v in r.items() if f != "sampling"} for k, r in stored.items()}
    model = CountingNet()
    remeasured = run_audit_with_model(
        model, SPEC, CONFIG, out_dir=tmp_path / "o", model_sha256="ab" * 32, completed_shards=older
    )
    assert model.calls == DETECTION_CALLS
    assert _without_run_fields(remeasured) == _without_run_fields(whole)


def test_stored_sampling_is_taken_only_when_every_shard_says_deterministic() -> None:
    shards = plan_shards(CONFIG, 2, ["model"])
    deterministic = {"model": {"stochastic": False, "output_spread": 0.0}}

    def records(*samplings: Any) -> dict[str, dict[str, Any]]:
        return {
            shard.shard_id: {"result": {}, **({} if s is None else {"sampling": s})}
            for shard, s in zip(shards, samplings, strict=False)
        }

    n = len(shards)
    assert stored_sampling(shards, records(*[deterministic] * n), False) == deterministic
    assert stored_sampling(shards, records(*[deterministic] * (n - 1)), False) is None  # missing
    assert stored_sampling(shards, records(*[deterministic] * (n - 1), None), False) is None
    sampler = {"model": {"stochastic": True, "output_spread": 0.3}}
    assert stored_sampling(shards, records(*[sampler] * n), False) is None
    assert stored_sampling(shards, records(*[deterministic] * (n - 1), sampler), False) is None
    assert stored_sampling(shards, records(*[{"model": None}] * n), False) is None
    # with a reference model, both are needed
    assert stored_sampling(shards, records(*[deterministic] * n), True) is None


def test_the_finalising_entry_point_merges_stored_shards_without_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.engine import entry_points, model_loading

    loads: list[Path] = []

    def load_model(path: Path, *args: Any) -> torch.nn.Module:
        loads.append(path)
        return TinyNet()

    monkeypatch.setattr(model_loading, "load_model", load_model)
    fields: dict[str, Any] = {"model_sha256": "ab" * 32, "audit_id": "aud_1", "model_id": "mod_1"}

    def audit(out: str, **kwargs: Any) -> dict[str, Any]:
        return entry_points.run_audit(
            tmp_path / "model.pt", "torchscript", SPEC, CONFIG, out_dir=tmp_path / out,
            **fields, **kwargs,
        )  # fmt: skip

    whole = audit("whole")
    stored: dict[str, dict[str, Any]] = {}
    for shard in plan_audit(SPEC, CONFIG, None):
        audit(
            shard.shard_id,
            only_shards=[shard.shard_id],
            on_shard=lambda i, r: stored.update({i: json.loads(json.dumps(r))}),
        )
    loads.clear()
    progress: list[float] = []
    merged = audit(
        "merged", completed_shards=stored, on_progress=lambda f, c, m: progress.append(f)
    )
    assert loads == []
    assert _without_run_fields(merged) == _without_run_fields(whole)
    assert (tmp_path / "merged" / "report.json").read_text() == canonical_json(merged)
    assert progress[0] == 0.0 and progress[-1] == 1.0
    # a shard not stored: the model is loaded and the shard run, as before
    missing = sorted(stored)[0]
    partial = audit("partial", completed_shards={k: v for k, v in stored.items() if k != missing})
    assert len(loads) == 1
    assert _without_run_fields(partial) == _without_run_fields(whole)
