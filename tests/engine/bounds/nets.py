"""Tiny networks built from the supported layers, with random weights and batch-norm statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def randomise_batch_norm(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            n = module.num_features
            module.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(1 + 0.5 * torch.randn(n, generator=generator))
            module.bias.data.copy_(0.2 * torch.randn(n, generator=generator))
    return model.eval()


class ConvResidual(nn.Module):
    """conv → batch norm → ReLU → conv, plus the input (a residual network)."""

    def __init__(self, channels: int = 4, leaky: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU(leaky) if leaky else nn.ReLU()
        self.conv2 = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.bn(self.conv1(x))))


class TinyUNet(nn.Module):
    """Down (max or average pooling), up (transposed convolution or nearest / bilinear
    resizing), concatenation of the skip, a residual output: the layers a U-Net is made of."""

    def __init__(
        self, channels: int = 4, pool: str = "max", up: str = "transposed", leaky: float = 0.0
    ) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        self.mid = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.up_mode = up
        if up == "transposed":
            self.up = nn.ConvTranspose2d(2 * channels, channels, 2, stride=2)
        else:
            self.up = nn.Conv2d(2 * channels, channels, 1)
        self.dec = nn.Conv2d(2 * channels, 1, 3, padding=1)
        self.leaky = leaky

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.leaky) if self.leaky else F.relu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.act(self.bn(self.enc(x)))
        deep = self.act(self.mid(self.pool(skip)))
        if self.up_mode == "transposed":
            up = self.up(deep)
        else:
            up = self.up(F.interpolate(deep, scale_factor=2, mode=self.up_mode))
        return x + self.dec(torch.cat([skip, self.act(up)], dim=1))


class Dense(nn.Module):
    """flatten → linear → ReLU → linear → ReLU → linear (a classifier's head)."""

    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearOnly(nn.Module):
    """Only affine layers: transposed convolution, average pooling, bilinear resizing,
    concatenation, batch norm, subtraction, scaling — its worst change is exactly σ_max(J)·ε."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.ConvTranspose2d(3, 2, 2, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.bn = nn.BatchNorm2d(5)
        self.out = nn.Conv2d(5, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        g = self.pool(self.b(h))
        u = F.interpolate(F.avg_pool2d(h, 2), scale_factor=2, mode="bilinear")
        z = self.bn(torch.cat([g, u], dim=1))
        return 0.5 * self.out(z) - x / 3
