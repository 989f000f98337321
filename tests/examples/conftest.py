"""The examples' tests share 2 CPU cores with other work: one thread."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
