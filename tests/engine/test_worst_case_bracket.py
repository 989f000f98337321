"""worst_case with `certify`: the bracket [found, U] per level and image, the verdict `proven`,
the `unproven` policy, an unsupported layer named, and reports without `certify` unchanged
(docs/theorem.md, "Brackets"). Tiny images (8×8 and smaller) so the bounds take milliseconds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from schemas import operators as ops
from schemas.audits import AuditConfig
from schemas.checks import WorstCaseCheck
from schemas.model_spec import ModelSpec
from schemas.reports import Report
from tests.engine.bounds.needle import RATIO, Needle
from workers.engine.audit import run_audit_with_model
from workers.engine.checks.bracket import ALLOWANCE
from workers.engine.checks.worst_case import WorstCase
from workers.engine.context import AuditContext, PassCounter
from workers.engine.operators import build_operator
from workers.engine.report import canonical_json
from workers.engine.subjects import model_subject

LEVEL = 0.05  # the needle's ε = δ‖y₀‖, as the check's level
SIZE = 8


def _spec(input: str = "measurement", shape: tuple[int, int, int] = (1, SIZE, SIZE)) -> ModelSpec:
    return ModelSpec(name="tiny", task="reconstruction", input=input, image_shape=shape)


def _needle() -> tuple[Needle, torch.Tensor]:
    """The needle around a seeded image x (float32, as the audit holds it): with the identity
    operator and no noise the audit's y is x, the needle's clean input."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, SIZE, SIZE, generator=generator)
    generator = torch.Generator().manual_seed(10_007)
    v = torch.randn(1, 1, SIZE, SIZE, generator=generator, dtype=torch.float64)
    eps = LEVEL * float(x.double().norm())
    return Needle(x.double(), eps, v / v.norm()).float(), x


def _context(images: torch.Tensor, operator: Any = None) -> AuditContext:
    operator = operator or build_operator(ops.DenoisingOperator(), tuple(images.shape[1:]))
    return AuditContext(
        operator=operator, images=images, device=torch.device("cpu"), seed=0, noise_level=0.0
    )


def _check(model: nn.Module, ctx: AuditContext, spec: ModelSpec, **fields: Any) -> dict:
    config = WorstCaseCheck.model_validate({"kind": "worst_case", "seed": 0, **fields})
    subject = model_subject(model, spec, ctx.operator, PassCounter())
    count = ctx.images.shape[0]
    shards = [WorstCase().run(config, ctx, subject, [i], 0) for i in range(count)]
    result = WorstCase().merge(config, shards)
    result.pop("_files")
    return result


def _needle_check(threshold: float, **certify: str) -> dict:
    model, x = _needle()
    return _check(
        model,
        _context(x),
        _spec(),
        levels=[LEVEL],
        target="reconstruction",
        threshold={"max_lipschitz": threshold},
        certify=certify,
    )


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_the_needle_gets_a_bracket_containing_its_worst_case(intermediate: str) -> None:
    result = _needle_check(3.0, intermediate=intermediate)
    (row,) = result["levels"]
    bracket = row["certified"]
    # the search reports 1.00; the truth, 2.93, lies in the bracket; U/L says how wide it is
    assert bracket["found"] == pytest.approx(1.0, abs=1e-3)
    assert bracket["found"] <= RATIO <= bracket["upper"] * (1 + ALLOWANCE)
    assert bracket["ratio"] == pytest.approx(bracket["upper"] / bracket["found"])
    (image,) = bracket["images"]
    assert image["index"] == 0 and image["upper"] == bracket["upper"]
    assert image["seconds"] >= 0 and image["peak_memory_bytes"] >= 0
    # the relative-error bracket: what was found, and ‖Ψ(y) − x‖ + U over ‖x‖ (here Ψ(y) = x)
    error = bracket["relative_error"]
    assert error["found"] <= error["upper"]
    assert error["upper"] == pytest.approx(bracket["upper"] * LEVEL, rel=1e-6)
    section = result["certify"]
    assert section["intermediate"] == intermediate and section["reason"] is None
    assert section["device"] == "cpu" and "ru_maxrss" in section["memory_measure"]
    if intermediate == "crown":  # CROWN's own intermediate bounds are exact on the needle
        assert bracket["upper"] == pytest.approx(RATIO, rel=1e-5)
        assert result["verdict"] == "proven" and section["proof"] == "proven"
        assert section["proven_level"] == LEVEL and bracket["proven"] is True
    else:  # IBP's box around the ℓ2 ball: sound, loose (about 31), not a proof of 3
        assert bracket["upper"] > 5 * RATIO
        assert result["verdict"] == "fail" and section["proof"] == "unproven"


@pytest.mark.parametrize("policy", ["fail", "pass"])
def test_a_threshold_below_the_needle_cannot_be_proven(policy: str) -> None:
    """max_lipschitz 2: the search alone passes it (1.00 ≤ 2), the truth (2.93) is above it,
    and U ≥ 2.93 cannot prove it: unproven, and the policy decides."""
    result = _needle_check(2.0, intermediate="crown", unproven=policy)
    searched, *certified = result["comparisons"]
    assert searched["quantity"] == "empirical Lipschitz lower bound" and searched["passed"]
    assert result["certify"]["proof"] == "unproven"
    assert result["levels"][0]["certified"]["proven"] is False
    assert result["certify"]["proven_level"] is None
    if policy == "fail":
        (comparison,) = certified
        assert not comparison["passed"] and comparison["measured"] >= RATIO
        assert result["verdict"] == "fail"
    else:  # no comparison that says what is not true; a warning says what was not proven
        assert certified == []
        assert result["verdict"] == "pass"
        assert any("not proven" in w and "'pass'" in w for w in result["warnings"])


class LinearNet(nn.Module):
    """Ψ(y) = B vec(y) + b as a linear layer (traceable), reshaped to the image."""

    def __init__(self, matrix: torch.Tensor, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.layer = nn.Linear(matrix.shape[1], matrix.shape[0])
        with torch.no_grad():
            self.layer.weight.copy_(matrix)
            self.layer.bias.fill_(0.1)
        self.shape = shape

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.flatten(y, 1)).view(-1, *self.shape)


def _linear_case(seed: int, n_in: int, shape: tuple[int, int, int]) -> LinearNet:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(math.prod(shape), n_in, generator=generator) / math.sqrt(n_in)
    return LinearNet(matrix, shape)


@pytest.mark.parametrize("input", ["measurement", "adjoint"])
def test_a_linear_model_is_proven_below_and_refuted_above(input: str) -> None:
    """On a linear model U = L (the search is exact there), so a threshold just above the top
    singular value is proven and one just below fails on the search."""
    shape = (1, SIZE, SIZE)
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, *shape, generator=generator)
    if input == "adjoint":  # MRI on real images: K = A*·P is dense
        operator = build_operator(ops.MRIOperator(acceleration=2.0, seed=1), shape)
        net = _linear_case(4, SIZE * SIZE, shape)
        gain = _gain(lambda e: net.layer.weight.double() @ _adjoint(operator, e), operator)
    else:  # inpainting: K is the 0/1 diagonal of the measured pixels
        operator = build_operator(ops.InpaintingOperator(fraction=0.7, seed=2), shape)
        net = _linear_case(5, SIZE * SIZE, shape)
        gain = _gain(lambda e: net.layer.weight.double() @ e.double().flatten(), operator)
    ctx = _context(images, operator)
    fields = {"levels": [0.01, 0.05], "steps": 60, "target": "reconstruction"}
    proven = _check(
        net,
        ctx,
        _spec(input, shape),
        threshold={"max_lipschitz": gain * 1.01},
        certify={},
        **fields,
    )
    for row in proven["levels"]:
        bracket = row["certified"]
        assert bracket["upper"] == pytest.approx(gain, rel=1e-5)
        assert bracket["found"] == pytest.approx(gain, rel=1e-3)
        assert bracket["proven"] is True
    assert proven["verdict"] == "proven" and proven["certify"]["proven_level"] == 0.05
    refuted = _check(
        net,
        ctx,
        _spec(input, shape),
        threshold={"max_lipschitz": gain * 0.99},
        certify={},
        **fields,
    )
    assert refuted["verdict"] == "fail" and refuted["certify"]["proof"] == "refuted"
    # without certify the same figures, no bracket
    plain = _check(
        net, ctx, _spec(input, shape), threshold={"max_lipschitz": gain * 1.01}, **fields
    )
    assert plain["verdict"] == "pass" and "certify" not in plain
    assert [r["relative_error"] for r in plain["levels"]] == [
        r["relative_error"] for r in proven["levels"]
    ]


def _adjoint(operator: Any, e: torch.Tensor) -> torch.Tensor:
    return operator.A_adjoint(e.view(1, *operator.measurement_shape)).double().flatten()


def _gain(apply: Any, operator: Any) -> float:
    """σ_max of e ↦ apply(e) over the measured entries (the exact worst change per radius)."""
    shape = tuple(operator.measurement_shape)
    mask = operator.project(torch.ones(1, *shape)).flatten().bool()
    columns = []
    for i in torch.nonzero(mask).flatten().tolist():
        e = torch.zeros(math.prod(shape), dtype=torch.float64)
        e[i] = 1.0
        columns.append(apply(e.view(1, *shape).float()).double())
    return float(torch.linalg.matrix_norm(torch.stack(columns, dim=1).detach(), ord=2))


def test_relative_error_is_proven_through_the_triangle_inequality_in_image_space() -> None:
    shape = (1, SIZE, SIZE)
    images = torch.rand(2, *shape, generator=torch.Generator().manual_seed(6))
    net = _linear_case(7, SIZE * SIZE, shape)
    ctx = _context(images)
    probe = _check(
        net,
        ctx,
        _spec("image", shape),
        levels=[0.05],
        space="image",
        certify={"unproven": "pass"},
        threshold={"max_relative_error": 10.0},
    )
    bracket = probe["levels"][0]["certified"]
    assert bracket["relative_error"]["found"] <= bracket["relative_error"]["upper"]
    between = (bracket["relative_error"]["found"] + bracket["relative_error"]["upper"]) / 2
    # a bound between found and certified: not proven; above the certified one: proven
    for bound, proof in (
        (between, "unproven"),
        (bracket["relative_error"]["upper"] * 1.01, "proven"),
    ):
        result = _check(
            net,
            ctx,
            _spec("image", shape),
            levels=[0.05],
            space="image",
            certify={"unproven": "fail"},
            threshold={"max_relative_error": bound},
        )
        assert result["certify"]["proof"] == proof
        assert result["verdict"] == ("proven" if proof == "proven" else "fail")


class Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + torch.tanh(self.conv(y))


def test_an_unsupported_layer_is_named_and_the_verdict_is_the_searchs() -> None:
    torch.manual_seed(0)
    net = Smooth()
    images = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    ctx = _context(images)
    fields = {"levels": [0.05], "steps": 20, "threshold": {"max_lipschitz": 10.0}}
    certified = _check(net, ctx, _spec(), certify={"unproven": "fail"}, **fields)
    plain = _check(net, ctx, _spec(), **fields)
    section = certified["certify"]
    assert "tanh" in section["reason"] and section["proof"] == "unavailable"
    assert any("no certified bound" in w and "tanh" in w for w in certified["warnings"])
    assert certified["verdict"] == plain["verdict"] == "pass"
    assert certified["comparisons"] == plain["comparisons"]
    assert certified["levels"][0]["certified"]["upper"] is None


def test_certify_needs_a_ball_and_a_lipschitz_bound_in_measurement_space() -> None:
    with pytest.raises(ValueError, match="formulation 'ball'"):
        WorstCaseCheck.model_validate({"formulation": "penalized", "certify": {}})
    with pytest.raises(ValueError, match="max_lipschitz"):
        WorstCaseCheck.model_validate(
            {"space": "image", "certify": {}, "threshold": {"max_lipschitz": 2.0}}
        )


def _audit(tmp_path: Path, model: nn.Module, x: torch.Tensor, check: dict) -> dict[str, Any]:
    np.save(tmp_path / "x.npy", x.numpy())
    config = AuditConfig.model_validate(
        {
            "dataset": {"file": "x.npy"},
            "operator": {"kind": "denoising"},
            "checks": [check],
            "noise_level": 0.0,
            "device": "cpu",
            "seed": 1,
        }
    )
    return run_audit_with_model(
        model, _spec(), config, out_dir=tmp_path / "out", model_sha256="ab" * 32, base_dir=tmp_path
    )


def test_an_audit_reports_the_bracket_and_a_proven_check_passes_it(tmp_path: Path) -> None:
    model, x = _needle()
    check = {
        "kind": "worst_case",
        "levels": [LEVEL],
        "target": "reconstruction",
        "threshold": {"max_lipschitz": 3.0},
        "certify": {"intermediate": "crown"},
    }
    report = _audit(tmp_path, model, x, check)
    Report.model_validate(report)
    (result,) = report["checks"]
    assert result["verdict"] == "proven" and report["verdict"] == "pass"
    assert report["config"]["checks"][0]["certify"] == {"intermediate": "crown", "unproven": "fail"}
    assert result["levels"][0]["certified"]["upper"] >= RATIO * (1 - ALLOWANCE)


def test_a_report_without_certify_has_no_trace_of_it(tmp_path: Path) -> None:
    model, x = _needle()
    check = {"kind": "worst_case", "levels": [LEVEL], "threshold": {"max_lipschitz": 3.0}}
    report = _audit(tmp_path, model, x, check)
    assert "certif" not in canonical_json(report)
    assert report["checks"][0]["verdict"] == "pass"
