"""`small_cnn`: a small convolutional image classifier, a registered architecture so that a
classifier can be uploaded as `.safetensors` weights and run no uploaded code.

Two 3×3 convolution + ReLU + 2×2 max-pool stages (`width`, 2·`width` channels), global average
pooling and a linear layer to `num_classes` logits: any image size of at least 4×4.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if not (1 <= width <= 256):
            raise ValueError("width must be between 1 and 256")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))
