from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from schemas.operators import Operator as OperatorConfig
from tests.engine.worst_case_fixtures import DenseOperator
from workers.engine import nullspace
from workers.engine.nullspace import null_component, smallest_directions
from workers.engine.operators import build_operator

CONFIGS = [
    ({"kind": "mri", "mask": "random_lines", "seed": 1}, (2, 16, 16)),
    ({"kind": "mri", "mask": "cartesian"}, (1, 16, 16)),
    ({"kind": "radon", "angles": 8}, (1, 16, 16)),
    ({"kind": "gaussian", "m": 100, "seed": 3}, (1, 16, 16)),
    ({"kind": "inpainting", "fraction": 0.4}, (1, 16, 16)),
    ({"kind": "blur", "kernel": "box", "size": 4}, (1, 16, 16)),
    ({"kind": "denoising"}, (1, 16, 16)),
]


def _operator(config: dict[str, object], shape: tuple[int, int, int]):  # type: ignore[no-untyped-def]
    return build_operator(TypeAdapter(OperatorConfig).validate_python(config), shape)


@pytest.mark.parametrize(("config", "shape"), CONFIGS, ids=[c["kind"] for c, _ in CONFIGS])
def test_a_null_space_pair_has_the_same_measurements(
    config: dict[str, object], shape: tuple[int, int, int]
) -> None:
    operator = _operator(config, shape)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, *shape, generator=generator)
    d = torch.rand(2, *shape, generator=generator)
    component = null_component(operator, d)
    x_other = x + component.z
    gap = operator.norm(operator.A(x) - operator.A(x_other))
    assert (gap <= 1e-6 * operator.norm(operator.A(x))).all()
    assert (component.residual <= 1e-5).all()
    if config["kind"] == "denoising":
        assert component.z.abs().max() == 0  # A = I has no null space
    elif config["kind"] in ("mri", "radon", "gaussian", "inpainting"):
        assert (component.z.flatten(1).norm(dim=1) > 0.1).all()  # undersampled: a real kernel


def test_conjugate_gradients_agree_with_the_exact_projection() -> None:
    operator = _operator({"kind": "gaussian", "m": 100, "seed": 3}, (1, 16, 16))
    d = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    exact = null_component(operator, d, method="dense")
    iterative = null_component(operator, d, method="cg", iterations=300, tolerance=1e-9)
    assert iterative.method == "cg" and 0 < iterative.iterations <= 300
    assert torch.allclose(iterative.z, exact.z, atol=1e-4)
    assert (iterative.residual < 1e-5).all()


def _diagonal_operator(values: list[float]) -> DenseOperator:
    return DenseOperator(torch.diag(torch.tensor(values)), (1, 1, len(values)))


@pytest.mark.parametrize("dense_limit", [1024, 0], ids=["svd", "power-iteration"])
def test_smallest_non_zero_singular_directions_are_found(
    dense_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nullspace, "DENSE_MAX_UNKNOWNS", dense_limit)
    values = [1.0] * 40
    values[7], values[21], values[30] = 0.0, 0.05, 0.2  # one exact null direction
    operator = _diagonal_operator(values)
    found = smallest_directions(operator, 2, torch.device("cpu"), iterations=500)
    assert found.singular_values == pytest.approx([0.05, 0.2], rel=1e-3)
    # the directions are the basis vectors 21 and 30 (up to sign); the null one is left out
    assert found.vectors.flatten(1).abs().argmax(1).tolist() == [21, 30]
    assert found.null_dimension_seen >= 1
