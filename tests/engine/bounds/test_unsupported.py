"""A model with a layer outside the supported set gets no bound, and the reason names it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.bounds import Unbounded, ball, certify_output_change


class Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) + x


class Squash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clamp(-1, 1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Squash.apply(x)


class Product(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Bicubic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bicubic")


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


CASES = [
    (Sine(), "sin"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU()), "GELU"),
    # torch.fx traces through a custom autograd Function's forward: its op is the one named
    (Custom(), "clamp"),
    (Product(), "product of two input-dependent tensors"),
    (Bicubic(), "bicubic"),
    (DataDependent(), "torch.fx cannot trace"),
    # the model is bounded in eval mode, as the engine runs it: batch statistics stay nonlinear
    (
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)),
        "without running statistics",
    ),
]


@pytest.mark.parametrize(("model", "named"), CASES, ids=[named for _, named in CASES])
def test_an_unsupported_layer_is_named(model: nn.Module, named: str) -> None:
    result = certify_output_change(model, ball(torch.randn(1, 1, 8, 8), 0.1))
    assert isinstance(result, Unbounded)
    assert named in result.reason


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script's deprecation
def test_a_torchscript_model_is_unbounded() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()))
    result = certify_output_change(scripted, ball(torch.randn(1, 1, 8, 8), 0.1))
    assert isinstance(result, Unbounded)
    assert "TorchScript" in result.reason


def test_the_first_unsupported_layer_is_the_one_named() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Tanh(), nn.GELU())
    result = certify_output_change(model, ball(torch.randn(1, 1, 8, 8), 0.1))
    assert isinstance(result, Unbounded)
    assert "Tanh" in result.reason and "GELU" not in result.reason


class Classifier(nn.Module):
    """The functional forms a classifier is often written with: F.conv2d and F.max_pool2d on
    parameters, x.view(x.size(0), ...), h.shape, F.dropout in eval, F.linear. (A branch on
    a hidden tensor's shape would not trace: torch.fx knows only the input's shape.)"""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 1, 3, 3))
        self.b = nn.Parameter(torch.randn(3))
        self.head = nn.Parameter(torch.randn(4, 3 * 4 * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(x, self.w, self.b, padding=1))
        h = F.max_pool2d(h, 2)
        h = F.dropout(h, 0.5, training=self.training)
        h = h.view(x.size(0), h.shape[1], -1)  # a shape query on a hidden tensor, too
        return F.linear(h.flatten(1), self.head)


def test_functional_forms_and_shape_queries_are_bounded() -> None:
    from tests.engine.bounds.search import found_worst
    from workers.engine.bounds import Certificate

    torch.manual_seed(0)
    model = Classifier().eval()
    x = torch.randn(1, 1, 8, 8)
    certificate = certify_output_change(model, ball(x, 0.2))
    assert isinstance(certificate, Certificate), certificate
    assert certificate.upper >= found_worst(model, x, 0.2)
