"""The `worst_case` check end to end (run per shard, merge) on cases with exact answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.checks import WorstCaseCheck
from schemas.operators import MRIOperator
from tests.engine.worst_case_fixtures import DenseOperator, counting_subject, linear_subject
from workers.engine.batching import run_in_batches
from workers.engine.context import ARTIFACT_FILES_KEY, AuditContext, Subject
from workers.engine.operators import build_operator
from workers.engine.registry import get_check

torch.set_num_threads(1)

IMAGE_SHAPE = (1, 8, 8)  # SSIM needs at least 8 × 8


def _run(check: WorstCaseCheck, ctx: AuditContext, subject: Subject, shards: list[list[int]]):
    worst_case = get_check("worst_case")
    results = [worst_case.run(check, ctx, subject, indices, seed=11) for indices in shards]
    return worst_case.merge(check, results)


def _dense_context(seed: int = 0) -> tuple[AuditContext, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    operator = DenseOperator(torch.randn(32, 64, generator=gen), IMAGE_SHAPE)
    images = torch.rand(4, *IMAGE_SHAPE, generator=gen)
    recon = torch.randn(64, 32, generator=gen)
    return AuditContext(operator, images, torch.device("cpu"), seed=3, noise_level=0.0), recon


def test_linear_model_lipschitz_bound_matches_top_singular_value() -> None:
    ctx, recon = _dense_context()
    # default search settings: a pass must not depend on settings tuned to the case
    check = WorstCaseCheck(
        levels=[0.05, 0.1], target="reconstruction", threshold={"max_lipschitz": 100.0}
    )
    report = _run(check, ctx, linear_subject(recon, IMAGE_SHAPE), [[0, 1], [2, 3]])
    sigma_max = float(torch.linalg.svdvals(recon)[0])
    assert report["images"] == 4
    for row in report["levels"]:
        bound = row["lipschitz_lower_bound"]["max"]
        assert sigma_max * 0.99 <= bound <= sigma_max * (1 + 1e-5), (bound, sigma_max)
        assert row["relative_perturbation"]["max"] <= row["level"] * (1 + 1e-6)
    assert report["verdict"] == "pass"
    strict = WorstCaseCheck.model_validate(
        {**check.model_dump(by_alias=True), "threshold": {"max_lipschitz": sigma_max * 0.5}}
    )
    assert (
        _run(strict, ctx, linear_subject(recon, IMAGE_SHAPE), [[0, 1, 2, 3]])["verdict"] == "fail"
    )


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (0.0, 255.0), (-300.0, 300.0)])
@pytest.mark.parametrize("smallest", [0.2, 0.05, 0.01])
def test_default_check_reports_the_exact_worst_case_of_an_inverse(
    smallest: float, value_range: tuple[float, float]
) -> None:
    """Ψ = A⁻¹ for a rotated, ill-conditioned A: at level δ the worst relative error of image i
    is exactly δ‖y_i‖ / (σ_min ‖x_i‖) and the Lipschitz ratio 1/σ_min, with DEFAULT settings."""
    gen = torch.Generator().manual_seed(3)
    n = 64
    singular = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), n, dtype=torch.float64)
    left, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    forward = (left @ torch.diag(singular) @ right.T).float()
    inverse = (right @ torch.diag(1 / singular) @ left.T).float()
    low, high = value_range
    images = low + (high - low) * torch.rand(4, *IMAGE_SHAPE, generator=gen)
    ctx = AuditContext(
        DenseOperator(forward, IMAGE_SHAPE), images, torch.device("cpu"), seed=3, noise_level=0.0
    )
    levels = [0.01, 0.05]
    report = _run(
        WorstCaseCheck(levels=levels), ctx, linear_subject(inverse, IMAGE_SHAPE), [[0, 1], [2, 3]]
    )
    y = ctx.measurements([0, 1, 2, 3])
    ratio_y_x = torch.linalg.vector_norm(y.flatten(1), dim=1) / torch.linalg.vector_norm(
        images.flatten(1), dim=1
    )
    assert report["optimizer"] == "pgd" and report["restarts"] == 4
    for row, level in zip(report["levels"], levels, strict=True):
        exact_error = float((level * ratio_y_x / smallest).max())
        assert row["relative_error"]["max"] == pytest.approx(exact_error, rel=0.01)
        assert row["relative_error"]["max"] <= exact_error * (1 + 1e-3)
        bound = row["lipschitz_lower_bound"]["max"]
        assert bound == pytest.approx(1 / smallest, rel=0.01) and bound <= (1 + 1e-3) / smallest
        assert row["found_by"] == {"pgd": 4}
        # at least half the steps; the largest level's include the scout's search of it
        budget = 200 if level == levels[-1] else 100
        assert 50 <= row["steps"]["mean"] <= row["steps"]["max"] <= budget
        assert row["worst_image"]["optimizer"] == "pgd"


def test_a_search_stopped_early_reports_the_levels_it_finished() -> None:
    """Levels are searched from the smallest up (after the scout of the largest): a cancelled
    shard lacks the largest ones."""
    ctx, recon = _dense_context()
    check = WorstCaseCheck(levels=[0.01, 0.05, 0.1], steps=10, early_stop_tolerance=0.0)
    worst_case = get_check("worst_case")
    subject = linear_subject(recon, IMAGE_SHAPE)
    finished = worst_case.run(check, ctx, subject, [0, 1], seed=11)
    # 10 steps of 4 restarts × 2 images per level: a stop once the scout (the largest level)
    # and the smallest level have run, at the first check of 0.05 (which keeps its 2 steps)
    before = subject.counter.forward
    ctx.should_stop = lambda: subject.counter.forward - before > 2 * 10 * 4 * 2
    stopped = worst_case.run(check, ctx, subject, [2, 3], seed=11)
    assert [w["level"] for w in stopped["worst"]] == [0.01, 0.05]
    report = worst_case.merge(check, [finished, stopped])
    assert [row["level"] for row in report["levels"]] == [0.01, 0.05, 0.1]
    assert report["levels"][0]["found_by"] == {"pgd": 4}
    assert report["levels"][2]["found_by"] == {"pgd": 2}
    assert any("level 0.1: stopped" in w for w in report["warnings"])
    assert all(row["carried"] <= 2 for row in report["levels"])


@pytest.fixture
def mri_context() -> AuditContext:
    operator = build_operator(MRIOperator(acceleration=4, center_fraction=0.1), (2, 16, 16))
    images = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    return AuditContext(operator, images, torch.device("cpu"), seed=5, noise_level=0.01)


def test_zero_filled_mri_has_amplification_one(mri_context: AuditContext) -> None:
    subject = counting_subject(mri_context.operator.A_adjoint)
    levels = [0.01, 0.05, 0.2]
    check = WorstCaseCheck(levels=levels, steps=6, restarts=2)
    report = _run(check, mri_context, subject, [[0, 1], [2]])
    assert [row["level"] for row in report["levels"]] == levels
    for row in report["levels"]:
        assert row["amplification"]["mean"] == pytest.approx(1.0, abs=0.01)
        assert row["amplification"]["max"] == pytest.approx(1.0, abs=0.01)
        assert row["lipschitz_lower_bound"]["max"] == pytest.approx(1.0, abs=0.01)
        assert row["relative_error"]["max"] >= row["relative_error"]["mean"]
    assert report["verdict"] == "info"
    assert subject.counter.backward > 0 and subject.counter.forward > subject.counter.backward


def test_artifacts_hold_the_worst_perturbation_on_measured_entries(
    mri_context: AuditContext,
) -> None:
    subject = counting_subject(lambda y: torch.tanh(2 * mri_context.operator.A_adjoint(y)))
    check = WorstCaseCheck(levels=[0.05, 0.1], steps=4, restarts=1)
    report = _run(check, mri_context, subject, [[0], [1, 2]])
    files = report[ARTIFACT_FILES_KEY]
    assert sorted(files) == [
        f"worst_case-level{k}-{part}.npy"
        for k in (0, 1)
        for part in ("clean", "original", "perturbation", "reconstruction")
    ]
    operator = mri_context.operator
    for k, row in enumerate(report["levels"]):
        e = torch.from_numpy(files[f"worst_case-level{k}-perturbation.npy"])
        assert tuple(e.shape) == operator.measurement_shape
        assert torch.count_nonzero(e * (1 - operator.mask)) == 0
        y = mri_context.measurements([row["worst_image"]["index"]])
        assert float(operator.norm(e[None])) <= row["level"] * float(operator.norm(y)) * (1 + 1e-6)
        attacked = files[f"worst_case-level{k}-reconstruction.npy"]
        np.testing.assert_allclose(attacked, subject.reconstruct(y + e[None])[0].numpy(), atol=1e-5)
        clean = files[f"worst_case-level{k}-clean.npy"]
        np.testing.assert_allclose(clean, subject.reconstruct(y)[0].numpy(), atol=1e-5)
        original = files[f"worst_case-level{k}-original.npy"]
        np.testing.assert_array_equal(original, mri_context.images[row["worst_image"]["index"]])


def test_out_of_memory_halves_the_batch_and_warns() -> None:
    calls: list[int] = []

    def work(start: int, stop: int) -> list[int]:
        calls.append(stop - start)
        if stop - start > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return list(range(start, stop))

    warnings: list[str] = []
    results = run_in_batches(work, total=10, batch_size=10, warnings=warnings)
    assert [i for batch in results for i in batch] == list(range(10))
    assert calls[:3] == [10, 5, 2]
    assert len(warnings) == 2 and "out of memory" in warnings[0]

    def broken(start: int, stop: int) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_in_batches(broken, total=4, batch_size=4, warnings=[])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_in_batches(lambda a, b: work(0, 10), total=1, batch_size=1, warnings=[])


def test_worst_case_check_survives_out_of_memory() -> None:
    ctx, recon = _dense_context()
    plain = linear_subject(recon, IMAGE_SHAPE)

    def small_memory(y: torch.Tensor) -> torch.Tensor:
        if y.shape[0] > 4:  # restarts × images: only 2 images at a time fit
            raise RuntimeError("CUDA out of memory (simulated)")
        return plain.reconstruct(y)

    # no early stopping: its test looks at the whole batch, so it may stop at another step
    check = WorstCaseCheck(levels=[0.1], steps=5, restarts=2, early_stop_tolerance=0.0)
    report = _run(check, ctx, Subject("model", small_memory), [[0, 1, 2, 3]])
    assert report["images"] == 4
    assert any("out of memory" in w for w in report["warnings"])
    # each image has its own random stream: one batch gives the same numbers
    unlimited = _run(check, ctx, linear_subject(recon, IMAGE_SHAPE), [[0, 1, 2, 3]])
    for name in ("relative_error", "lipschitz_lower_bound"):
        assert report["levels"][0][name] == pytest.approx(unlimited["levels"][0][name], rel=1e-5)
