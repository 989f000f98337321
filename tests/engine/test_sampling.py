"""workers.engine.sampling: the average map, common random numbers, replicate statistics, the
noise floor and probabilities over a sampler's draws."""

from __future__ import annotations

import math

import pytest
import torch

from workers.engine.context import PassCounter, Subject
from workers.engine.sampling import (
    AveragedModel,
    averaged_subject,
    noise_floor,
    probability,
    replicate_statistics,
    same_draws,
    single_draws,
    summary_errors,
)

CPU = torch.device("cpu")


def noisy_linear(gain: float, sigma: float) -> torch.nn.Module:
    class Noisy(torch.nn.Module):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return gain * y + sigma * torch.randn_like(y)

    return Noisy()


def test_the_average_keeps_the_gradient_and_divides_the_noise() -> None:
    model = AveragedModel(noisy_linear(2.0, 1.0), draws=64)
    y = torch.zeros(4, 1, 8, 8, requires_grad=True)
    with same_draws(0, CPU):
        out = model(y)
    (gradient,) = torch.autograd.grad(out.sum(), y)
    assert torch.allclose(gradient, torch.full_like(y, 2.0))
    # the average of 64 draws of unit noise: standard deviation 1/8
    assert float(out.detach().std()) == pytest.approx(1 / 8, rel=0.15)


def test_a_seeded_average_draws_the_same_samples_on_every_call() -> None:
    fixed = AveragedModel(noisy_linear(1.0, 1.0), draws=4, seed=5)
    y = torch.zeros(2, 1, 4, 4)
    assert torch.equal(fixed(y), fixed(y))
    fresh = AveragedModel(noisy_linear(1.0, 1.0), draws=4)
    assert not torch.equal(fresh(y), fresh(y))


def test_same_draws_give_common_random_numbers_and_restore_the_state() -> None:
    model = noisy_linear(3.0, 1.0)
    y = torch.rand(2, 1, 4, 4)
    e = 0.01 * torch.randn_like(y)
    state = torch.random.get_rng_state()
    with same_draws(11, CPU):
        clean = model(y)
    with same_draws(11, CPU):
        shifted = model(y + e)
    assert torch.equal(state, torch.random.get_rng_state())
    # the noise cancels: the difference is the map's own, 3e
    assert torch.allclose(shifted - clean, 3.0 * e, atol=1e-6)


def test_the_averaged_subject_counts_every_draw() -> None:
    counter = PassCounter()

    def reconstruct(y: torch.Tensor) -> torch.Tensor:
        counter.forward += y.shape[0]
        return y

    averaged = averaged_subject(Subject("model", reconstruct, counter), draws=8)
    averaged.reconstruct(torch.zeros(3, 1, 2, 2))
    averaged.counter.backward += 3  # a backward through the average: 8 of the model's
    assert (counter.forward, counter.backward) == (24, 24)
    assert (averaged.counter.forward, averaged.counter.backward) == (24, 24)


def test_replicate_statistics_are_the_mean_and_its_standard_error() -> None:
    values = torch.tensor([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0], [2.0, 5.0]])
    mean, error = replicate_statistics(values)
    assert mean.tolist() == [2.0, 5.0]
    assert error[0].item() == pytest.approx(math.sqrt(2 / 3) / 2)
    assert error[1].item() == 0.0


def test_summary_errors_follow_the_statistic() -> None:
    errors = summary_errors([1.0, 4.0, 2.0], [0.3, 0.4, 0.0], ("mean", "max", "min", "std"))
    assert errors["mean"] == pytest.approx(0.5 / 3)
    assert errors["max"] == 0.4 and errors["min"] == 0.3 and errors["std"] is None


@pytest.mark.parametrize(("sigma", "seed"), [(0.05, 0), (0.3, 1)])
def test_the_noise_floor_of_additive_noise_is_sigma_root_n(sigma: float, seed: int) -> None:
    y = torch.rand(4, 1, 16, 16)
    with same_draws(seed, CPU):
        floor = noise_floor(noisy_linear(0.5, sigma), y)
    exact = sigma * math.sqrt(256)
    assert floor["ci_low"] <= exact <= floor["ci_high"]
    assert floor["value"] == pytest.approx(exact, rel=0.05)
    assert floor["inputs"] == 4 and floor["draws_per_input"] == 32


def test_a_deterministic_model_has_no_noise_floor() -> None:
    floor = noise_floor(lambda y: 2 * y, torch.rand(2, 1, 4, 4))
    assert floor["value"] == floor["ci_low"] == floor["ci_high"] == 0.0


def test_single_draws_call_the_model_once_per_input_and_draw() -> None:
    calls = []

    def once_per_call(y: torch.Tensor) -> torch.Tensor:
        calls.append(y.shape[0])
        return y + torch.rand(()).item()  # one draw per call: shared by a batch

    outputs = single_draws(once_per_call, torch.zeros(3, 1, 2, 2), samples=5)
    assert outputs.shape == (5, 3, 1, 2, 2) and calls == [1] * 15
    assert len({float(v) for v in outputs[:, :, 0, 0, 0].flatten()}) == 15


def test_probability_carries_the_clopper_pearson_interval() -> None:
    found = probability(3, 10)
    assert found["estimate"] == 0.3 and found["count"] == 3 and found["trials"] == 10
    assert found["ci_low"] == pytest.approx(0.0667, abs=1e-4)
    assert found["ci_high"] == pytest.approx(0.6525, abs=1e-4)
    assert probability(0, 0)["estimate"] is None
