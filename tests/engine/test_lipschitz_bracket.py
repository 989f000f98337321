"""lipschitz with `certify`: the bracket [found, U] of the largest Jacobian norm over a ball around
each measurement, against the exact value of small ReLU networks; the verdict `proven`, the
`unproven` policy, an unsupported layer and a too large input named, reports without `certify`
unchanged, and the bracket in JUnit and the page (docs/theorem.md, "Brackets")."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from schemas import operators as ops
from schemas.audits import AuditConfig
from schemas.checks import LipschitzCheck, WorstCaseCheck
from schemas.model_spec import ModelSpec
from schemas.reports import Report
from service.reports.junit import render_junit
from tests.engine.bounds.exact_relu import exact_lipschitz, layers_of, random_network
from workers.engine.audit import run_audit_with_model
from workers.engine.checks.bracket import ALLOWANCE
from workers.engine.checks.lipschitz import Lipschitz
from workers.engine.checks.lipschitz_bracket import MAX_PERTURBATION_ENTRIES
from workers.engine.context import AuditContext, PassCounter
from workers.engine.operators import build_operator
from workers.engine.report import canonical_json
from workers.engine.subjects import model_subject
from workers.reporting.html import build_sections

TINY = (1, 2, 2)  # four measurements: the exact Lipschitz constant enumerates activation patterns
SIZE = 8
RADIUS = 0.3


class Flat(nn.Module):
    """A Linear/ReLU network on the flattened measurement, reshaped to the image."""

    def __init__(self, body: nn.Module, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.body = body
        self.shape = shape

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.body(torch.flatten(y, 1)).view(-1, *self.shape)


def _spec(shape: tuple[int, int, int], input: str = "measurement") -> ModelSpec:
    return ModelSpec(name="tiny", task="reconstruction", input=input, image_shape=shape)


def _context(images: torch.Tensor, operator: Any = None) -> AuditContext:
    operator = operator or build_operator(ops.DenoisingOperator(), tuple(images.shape[1:]))
    return AuditContext(
        operator=operator, images=images, device=torch.device("cpu"), seed=0, noise_level=0.0
    )


def _check(model: nn.Module, ctx: AuditContext, spec: ModelSpec, **fields: Any) -> dict:
    config = LipschitzCheck.model_validate({"kind": "lipschitz", "seed": 0, **fields})
    subject = model_subject(model, spec, ctx.operator, PassCounter())
    shards = [Lipschitz().run(config, ctx, subject, [i], 0) for i in range(ctx.images.shape[0])]
    return Lipschitz().merge(config, shards)


def _relu_case(seed: int) -> tuple[Flat, torch.Tensor]:
    rng = np.random.default_rng([25, seed])
    body = random_network(rng, 4, (6,), 4).float()
    x = torch.from_numpy(rng.uniform(0, 1, size=(1, *TINY))).float()
    return Flat(body, TINY), x


def _exact(model: Flat, x: torch.Tensor, half_width: float) -> float:
    """The exact Lipschitz constant of the network on the box x ± half_width (float64 copy)."""
    y = x.double().flatten().numpy()
    return exact_lipschitz(layers_of(model.body), y - half_width, y + half_width)


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_the_bracket_contains_the_exact_lipschitz_constant_over_the_ball(
    intermediate: str,
) -> None:
    """The ℓ2 ball of radius ε lies between the boxes of half-widths ε/√d and ε: the exact
    constants on them bound the ball's from below and above, and where they agree they are the
    ball's. Every case: U is above the inner box's, found below the outer's; where they agree
    the exact value lies inside [found, U], strictly above found for at least one case."""
    inside = 0
    for seed in range(4):
        model, x = _relu_case(seed)
        result = _check(
            model,
            _context(x),
            _spec(TINY),
            certify={"radius": RADIUS, "intermediate": intermediate},
            tolerance=1e-8,
        )
        bracket = result["certified"]
        assert result["certify"]["reason"] is None and bracket["upper"] is not None
        eps = RADIUS * float(x.double().norm())
        inner, outer = _exact(model, x, eps / 2), _exact(model, x, eps)  # √d = 2
        assert bracket["upper"] * (1 + ALLOWANCE) >= inner
        assert bracket["found"] <= outer * (1 + 1e-6)
        # the found norm is the Jacobian's at y, the center: the exact norm of its pattern
        assert bracket["found"] == pytest.approx(_exact(model, x, 1e-6), rel=1e-5)
        if math.isclose(inner, outer, rel_tol=1e-9):
            assert bracket["found"] * (1 - 1e-6) <= inner <= bracket["upper"] * (1 + ALLOWANCE)
            inside += bracket["found"] < 0.99 * inner
        (image,) = bracket["images"]
        assert image["index"] == 0 and image["upper"] == bracket["upper"]
        assert image["ratio"] == pytest.approx(bracket["upper"] / bracket["found"])
        assert image["radius"] == pytest.approx(eps)
        assert image["seconds"] >= 0 and image["peak_memory_bytes"] >= 0
    assert inside >= 1


def _relu_probe() -> tuple[Flat, AuditContext, dict]:
    model, x = _relu_case(1)
    ctx = _context(x)
    probe = _check(model, ctx, _spec(TINY), certify={"radius": RADIUS})
    return model, ctx, probe["certified"]


@pytest.mark.parametrize("policy", ["fail", "pass"])
def test_a_threshold_between_found_and_upper_is_unproven(policy: str) -> None:
    model, ctx, bracket = _relu_probe()
    assert bracket["upper"] > 1.1 * bracket["found"]  # a bracket with room inside
    between = (bracket["found"] + bracket["upper"]) / 2
    result = _check(
        model,
        ctx,
        _spec(TINY),
        certify={"radius": RADIUS, "unproven": policy},
        threshold={"max_jacobian_norm": between},
    )
    found, *certified = result["comparisons"]
    assert found["quantity"] == "largest Jacobian spectral norm" and found["passed"]
    assert result["certify"]["proof"] == "unproven" and result["certified"]["proven"] is False
    if policy == "fail":
        (comparison,) = certified
        assert not comparison["passed"]
        assert comparison["measured"] == pytest.approx(bracket["upper"] * (1 + ALLOWANCE))
        assert result["verdict"] == "fail"
    else:
        assert certified == [] and result["verdict"] == "pass"
        assert any("not proven" in w and "'pass'" in w for w in result["warnings"])
    above = _check(
        model,
        ctx,
        _spec(TINY),
        certify={"radius": RADIUS},
        threshold={"max_jacobian_norm": bracket["upper"] * 1.01},
    )
    assert above["verdict"] == "proven" and above["certify"]["proof"] == "proven"


class LinearNet(nn.Module):
    """Ψ(y) = B vec(y) + b as a linear layer, reshaped to the image."""

    def __init__(self, seed: int, n_in: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(math.prod(shape), n_in, generator=generator) / math.sqrt(n_in)
        self.layer = nn.Linear(n_in, math.prod(shape))
        with torch.no_grad():
            self.layer.weight.copy_(matrix)
            self.layer.bias.fill_(0.1)
        self.shape = shape

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.flatten(y, 1)).view(-1, *self.shape)


def _gain(net: LinearNet, operator: Any, adjoint: bool) -> float:
    """σ_max of e ↦ B·(A*)P e over the measured entries: the exact Jacobian norm everywhere."""
    shape = tuple(operator.measurement_shape)
    mask = operator.project(torch.ones(1, *shape)).flatten().bool()
    columns = []
    for i in torch.nonzero(mask).flatten().tolist():
        e = torch.zeros(1, math.prod(shape), dtype=torch.float64)
        e[0, i] = 1.0
        z = operator.A_adjoint(e.view(1, *shape)) if adjoint else e
        columns.append(net.layer.weight.double() @ z.double().flatten())
    return float(torch.linalg.matrix_norm(torch.stack(columns, dim=1).detach(), ord=2))


@pytest.mark.parametrize("input", ["measurement", "adjoint"])
def test_a_linear_model_is_proven_above_and_refuted_below(input: str) -> None:
    shape = (1, SIZE, SIZE)
    images = torch.rand(2, *shape, generator=torch.Generator().manual_seed(3))
    if input == "adjoint":  # MRI: K = A*·P, dense
        operator = build_operator(ops.MRIOperator(acceleration=2.0, seed=1), shape)
    else:  # inpainting: K is the 0/1 diagonal of the measured pixels
        operator = build_operator(ops.InpaintingOperator(fraction=0.7, seed=2), shape)
    net = LinearNet(4, SIZE * SIZE, shape)
    gain = _gain(net, operator, input == "adjoint")
    ctx = _context(images, operator)
    fields = {"tolerance": 1e-8, "iterations": 60}
    proven = _check(
        net,
        ctx,
        _spec(shape, input),
        threshold={"max_jacobian_norm": gain * 1.01},
        certify={},
        **fields,
    )
    bracket = proven["certified"]
    assert len(bracket["images"]) == 2
    for image in bracket["images"]:
        assert gain <= image["upper"] <= gain * (1 + 1e-6)  # U = L: the margins only
        assert image["found"] == pytest.approx(gain, rel=1e-6)
    assert bracket["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert proven["verdict"] == "proven" and bracket["proven"] is True
    assert proven["certify"]["radius"] == 0.01 and proven["certify"]["proof"] == "proven"
    refuted = _check(
        net,
        ctx,
        _spec(shape, input),
        threshold={"max_jacobian_norm": gain * 0.99},
        certify={},
        **fields,
    )
    assert refuted["verdict"] == "fail" and refuted["certify"]["proof"] == "refuted"


class Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + torch.tanh(self.conv(y))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + torch.relu(self.conv(y))


@pytest.mark.parametrize(
    ("net", "side", "named"),
    [(Smooth, SIZE, "tanh"), (Residual, 33, str(MAX_PERTURBATION_ENTRIES))],
)
def test_an_unbounded_network_or_input_is_named_and_the_verdict_stands(
    net: type[nn.Module], side: int, named: str
) -> None:
    torch.manual_seed(0)
    model = net()
    images = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(8))
    ctx = _context(images)
    spec = _spec((1, side, side))
    fields = {"iterations": 10, "threshold": {"max_jacobian_norm": 10.0}}
    certified = _check(model, ctx, spec, certify={"unproven": "fail"}, **fields)
    plain = _check(model, ctx, spec, **fields)
    section = certified["certify"]
    assert named in section["reason"] and section["proof"] == "unavailable"
    assert any("no certified bound" in w and named in w for w in certified["warnings"])
    assert certified["verdict"] == plain["verdict"] == "pass"
    assert certified["comparisons"] == plain["comparisons"]
    assert certified["certified"]["upper"] is None and certified["certified"]["images"] == []
    assert certified["per_image"] == plain["per_image"]


def test_the_schema_adds_radius_to_lipschitz_only() -> None:
    check = LipschitzCheck.model_validate({"certify": {}})
    assert check.certify is not None and check.certify.radius == 0.01
    with pytest.raises(ValueError, match="radius"):
        LipschitzCheck.model_validate({"certify": {"radius": 0}})
    with pytest.raises(ValueError, match="radius"):  # worst_case's radii are its levels
        WorstCaseCheck.model_validate({"certify": {"radius": 0.1}})


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
        model,
        _spec(TINY),
        config,
        out_dir=tmp_path / "out",
        model_sha256="ab" * 32,
        base_dir=tmp_path,
    )


def test_an_audit_reports_and_renders_the_bracket(tmp_path: Path) -> None:
    model, x = _relu_case(1)
    check = {
        "kind": "lipschitz",
        "threshold": {"max_jacobian_norm": 100.0},
        "certify": {"radius": RADIUS},
    }
    report = _audit(tmp_path, model, x, check)
    Report.model_validate(report)
    (result,) = report["checks"]
    assert result["verdict"] == "proven" and report["verdict"] == "pass"
    assert report["config"]["checks"][0]["certify"] == {
        "intermediate": "ibp",
        "unproven": "fail",
        "radius": RADIUS,
    }
    bracket = result["certified"]
    root = ET.fromstring(render_junit(report))
    (case,) = [c for c in root.iter("testcase") if "lipschitz" in c.get("name", "")]
    properties = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert properties["verdict"] == "proven" and properties["certified: proof"] == "proven"
    assert float(properties["certified: upper at radius 0.3"]) == pytest.approx(
        bracket["upper"], rel=1e-5
    )
    text = case.findtext("system-out") or ""
    assert "bracket at radius 0.3: Jacobian norm over the ball [" in text
    assert "; proven" in text and "proof: proven" in text
    (section,) = [s for s in build_sections(report, tmp_path / "out") if s.kind == "lipschitz"]
    (table,) = [t for t in section.tables if "certified bracket" in t["title"]]
    (row,) = table["rows"]
    assert row["level"] == "0.3" and row["cells"][3] == "proven"
    assert len(row["cells"]) == len(table["headers"])


def test_a_report_without_certify_has_no_trace_of_it(tmp_path: Path) -> None:
    model, x = _relu_case(1)
    check = {"kind": "lipschitz", "threshold": {"max_jacobian_norm": 100.0}}
    report = _audit(tmp_path, model, x, check)
    assert "certif" not in canonical_json(report)
    assert "certif" not in canonical_json(report["checks"][0])
    assert report["checks"][0]["verdict"] == "pass"
