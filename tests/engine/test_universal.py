"""`universal`: one perturbation for many inputs, computed on a training split, scored on the
held-out split; for a linear classifier and a linear reconstruction the answer is known."""

from __future__ import annotations

import pytest
import torch

from schemas.audits import AuditConfig
from schemas.checks_classifier import UniversalCheck
from tests.engine.classifier_fixtures import context, linear_case, spec, subject
from tests.engine.tiny_models import GainAlong
from workers.engine.checks.universal import Universal, split
from workers.engine.context import ARTIFACT_FILES_KEY, PassCounter, Subject
from workers.engine.shards import plan_shards
from workers.shared.errors import EngineInputError

KIND = Universal()


def test_split_is_seeded_disjoint_and_non_empty() -> None:
    train, held = split(range(10), 0.5, seed=3)
    assert sorted(train + held) == list(range(10)) and len(train) == 5
    assert split(range(10), 0.5, seed=3) == (train, held)
    assert split(range(10), 0.5, seed=4) != (train, held)
    assert len(split(range(2), 0.99, seed=0)[1]) == 1
    with pytest.raises(EngineInputError, match="at least 2 images"):
        split([0], 0.5, seed=0)


def test_linear_classifier_fooling_rate_is_exact() -> None:
    """All images on the class-1 side: the best ℓ∞ perturbation is −ε·sign(w), which fools
    exactly the held-out images whose margin f is below ε‖w‖₁."""
    model, x, _ = linear_case(count=20, one_side=True)
    labels = torch.ones(len(x), dtype=torch.long)
    f = model.f(x)
    dual = float(model.w.abs().sum())
    epsilon = float(f.sort().values[10]) / dual * 1.001  # about half the images can be fooled
    check = UniversalCheck.model_validate(
        {"epsilon": epsilon, "steps": 30, "step_size": 0.2, "train_fraction": 0.5}
    )
    shard = KIND.run(check, context(x, labels), subject(model, spec()), range(len(x)), 5)
    result = KIND.merge(check, [shard])
    held = shard["held_out_images"]
    expected = int((f[held] < epsilon * dual).sum())
    assert result["fooled"] == expected and result["trials"] == len(held)
    assert result["fooling_rate"]["estimate"] == expected / len(held)
    low, high = result["fooling_rate"]["ci_low"], result["fooling_rate"]["ci_high"]
    assert low <= expected / len(held) <= high
    u = torch.tensor(result[ARTIFACT_FILES_KEY]["universal.npy"])
    assert torch.allclose(u.flatten(), -epsilon * model.w.sign(), atol=1e-6)
    assert result[ARTIFACT_FILES_KEY]["universal.png"][:4] == b"\x89PNG"


def test_threshold_bounds_the_upper_end_of_the_interval() -> None:
    model, x, labels = linear_case(count=10, one_side=True)
    base = {"epsilon": 1e-4, "steps": 3}  # far too small to fool anything
    for bound, verdict in ((0.9, "pass"), (0.1, "fail")):  # 5 trials, 0 fooled: CI up to 0.52
        check = UniversalCheck.model_validate({**base, "threshold": {"max_fooling_rate": bound}})
        shard = KIND.run(check, context(x, labels), subject(model, spec()), range(10), 0)
        assert KIND.merge(check, [shard])["verdict"] == verdict


def test_reconstruction_universal_perturbation_finds_the_unstable_direction() -> None:
    """Ψ(y) = y + (g − 1)⟨y, d⟩d amplifies only along d: the best single perturbation is ±d."""
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn((1, 8, 8), generator=gen)
    direction -= direction.mean()  # orthogonal to constant images: clean error exactly 0
    model = GainAlong(direction, gain=20.0)
    images = (0.4 + 0.2 * torch.rand((8, 1, 1, 1), generator=gen)).expand(8, 1, 8, 8).clone()
    ctx = context(images, None)  # type: ignore[arg-type]
    counter = PassCounter()

    def reconstruct(y: torch.Tensor) -> torch.Tensor:
        counter.forward += y.shape[0]
        return model(y)

    check = UniversalCheck.model_validate({"epsilon": 0.05, "steps": 20, "failure_error": 0.5})
    shard = KIND.run(check, ctx, Subject("model", reconstruct, counter), range(8), 1)
    result = KIND.merge(check, [shard])
    u = torch.tensor(result[ARTIFACT_FILES_KEY]["universal.npy"])
    cosine = float((u.flatten() @ direction.flatten()) / (u.norm() * direction.norm()))
    assert abs(cosine) > 0.99
    assert u.norm() == pytest.approx(result["radius"], rel=1e-4)
    assert result["radius"] == pytest.approx(
        0.05 * float(images[shard["train_images"]].flatten(1).norm(dim=1).mean()), rel=1e-5
    )
    # Ψ(x + u) − x = Ψ(u) = g·u: relative error g‖u‖/‖x‖ on every held-out image
    held = images[shard["held_out_images"]].flatten(1).norm(dim=1)
    expected = float((20.0 * u.norm() / held).mean())
    assert result["held_out_relative_error"]["perturbed_mean"] == pytest.approx(expected, rel=1e-3)
    assert result["held_out_relative_error"]["clean_mean"] < 1e-5
    assert result["fooled"] == int((20.0 * u.norm() / held > 0.5).sum())
    assert result["clean_failures"] == 0
    assert counter.backward > 0


def _gain_subject(model: torch.nn.Module) -> Subject:
    return Subject("model", lambda y: model(y), PassCounter())


def test_images_wrong_without_the_perturbation_are_not_counted_as_fooled() -> None:
    """Same Ψ as above; three images get a component a·d along the unstable direction, so Ψ
    multiplies it by 20: clean relative error 19a/‖x‖ > τ, wrong before any u. Every other
    image is exact without u and fooled with it (error 20‖u‖/‖x‖ ≈ 1 > τ). So the held-out
    images give fooled = trials = the correct ones, and the wrong ones are counted apart."""
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn((1, 8, 8), generator=gen)
    direction -= direction.mean()
    unit = direction / direction.norm()
    model = GainAlong(direction, gain=20.0)
    images = (0.4 + 0.2 * torch.rand((8, 1, 1, 1), generator=gen)).expand(8, 1, 8, 8).clone()
    seed, tau = 1, 0.5
    train, held = split(range(8), 0.5, seed)
    wrong = [held[0], held[1], train[0]]
    images[wrong] += 0.5 * unit
    clean_error = (19.0 * 0.5 / images.flatten(1).norm(dim=1))[wrong]
    assert bool((clean_error > tau).all())  # the construction: wrong before any u

    check = UniversalCheck.model_validate({"epsilon": 0.05, "steps": 20, "failure_error": tau})
    ctx = context(images, None)  # type: ignore[arg-type]
    shard = KIND.run(check, ctx, _gain_subject(model), range(8), seed)
    assert (shard["train_images"], shard["held_out_images"]) == (train, held)
    result = KIND.merge(check, [shard])
    correct = [k for k in held if k not in wrong]
    u = torch.tensor(result[ARTIFACT_FILES_KEY]["universal.npy"])
    assert abs(float(u.flatten() @ unit.flatten())) / float(u.norm()) > 0.99
    norms = images[correct].flatten(1).norm(dim=1)
    assert bool((20.0 * u.norm() / norms > tau).all())  # every correct image is fooled
    assert result["clean_failures"] == 2
    assert result["trials"] == len(correct) == result["fooled"]
    assert result["fooling_rate"]["estimate"] == 1.0
    assert result["train_clean_failures"] == 1
    assert result["train_fooling_rate"] == 1.0  # over the 3 correct training images
    assert result["warnings"] == []

    # every held-out image wrong: nothing can be fooled, the rate is undefined
    images[held] += 0.5 * unit
    ctx = context(images, None)  # type: ignore[arg-type]
    shard = KIND.run(check, ctx, _gain_subject(model), range(8), seed)
    limited = UniversalCheck.model_validate(
        {**check.model_dump(), "threshold": {"max_fooling_rate": 0.5}}
    )
    result = KIND.merge(limited, [shard])
    assert (result["fooled"], result["trials"], result["clean_failures"]) == (0, 0, len(held))
    assert result["fooling_rate"] == {"estimate": None, "ci_low": 0.0, "ci_high": 1.0}
    assert result["verdict"] == "fail" and "undefined" in result["warnings"][0]


def test_universal_runs_as_one_shard_and_refuses_linf_on_reconstructions() -> None:
    config = AuditConfig.model_validate(
        {
            "dataset": {"builtin": "ellipses", "count": 40, "size": 16},
            "operator": {"kind": "denoising"},
            "checks": [{"kind": "universal", "norm": "linf"}, {"kind": "random_noise"}],
            "budget": {"images_per_shard": 16},
        }
    )
    shards = plan_shards(config, 40, ["model"])
    assert [(s.kind, s.start, s.stop) for s in shards if s.kind == "universal"] == [
        ("universal", 0, 40)
    ]
    assert len([s for s in shards if s.kind == "random_noise"]) == 3
    images = torch.rand((4, 1, 8, 8))
    with pytest.raises(EngineInputError, match="norm 'l2'"):
        KIND.run(
            config.checks[0],
            context(images, None),
            Subject("model", lambda y: y),
            range(4),
            0,  # type: ignore[arg-type]
        )
