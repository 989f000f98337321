"""Ground-truth images x of an audit: built-in phantoms generated on the fly, or a local array."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from deepinv.utils.phantoms import generate_shepp_logan

from schemas.datasets import BuiltinDataset, DatasetRef, FileDataset, UploadedDataset
from schemas.model_spec import ModelSpec
from workers.engine.digits import digits
from workers.shared.arrays import load_array
from workers.shared.errors import EngineInputError


def load_images(ref: DatasetRef, base_dir: Path | None = None) -> torch.Tensor:
    """[N, C, H, W] float32 on the CPU. Built-in phantoms have values in [0, 1]; files are taken
    as they are."""
    if isinstance(ref, BuiltinDataset):
        if ref.builtin == "ellipses":
            return random_ellipses(ref.count, ref.size, ref.seed)
        if ref.builtin == "digits":
            return digits(ref.count, ref.size, ref.seed)[0]
        return shepp_logan(ref.count, ref.size)
    if isinstance(ref, UploadedDataset):
        raise EngineInputError(
            f"dataset {ref.dataset_id!r} was not resolved to a file before the audit"
        )
    assert isinstance(ref, FileDataset)
    # the images the gateway accepted at upload (schemas.archive_rules.images_shape)
    array = load_array(ref.file, ref.key, base_dir, images=True)
    if array.ndim == 3:
        array = array[:, None]
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def fit_images_to_spec(images: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """The images as the model sees them: same height and width as `spec.image_shape`; one real
    channel feeds a complex (2-channel) model as (real, 0)."""
    channels, height, width = spec.image_shape
    n, c, h, w = images.shape
    if (h, w) != (height, width):
        raise EngineInputError(f"dataset images are {h}×{w} but the model expects {height}×{width}")
    if c == channels:
        return images
    if c == 1 and spec.complex:
        return torch.cat([images, torch.zeros_like(images)], dim=1)
    raise EngineInputError(f"dataset images have {c} channel(s) but the model expects {channels}")


def scale_to_range(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Map [0, 1] phantoms onto the model's value range."""
    lo, hi = value_range
    return lo + (hi - lo) * images


def shepp_logan(count: int, size: int) -> torch.Tensor:
    """deepinv's Shepp–Logan phantom (generated in torch, no download), repeated `count` times."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.meshgrid's indexing warning inside deepinv
        phantom = generate_shepp_logan(size).float()
    return phantom.view(1, 1, size, size).repeat(count, 1, 1, 1).contiguous()


def random_ellipses(count: int, size: int, seed: int, ellipses: int = 12) -> torch.Tensor:
    """Seeded piecewise-constant phantoms: a sum of random ellipses (signed intensities), clipped
    to [0, 1]. deepinv's own generator draws from numpy's global RNG, so it is not used."""
    rng = np.random.default_rng(seed)
    axis = np.linspace(-1.0, 1.0, size)
    gx, gy = np.meshgrid(axis, axis, indexing="xy")
    out = np.zeros((count, 1, size, size), dtype=np.float64)
    for index in range(count):
        image = np.zeros((size, size))
        # a large bright body first, then inner structures of either sign
        for k in range(ellipses):
            if k == 0:
                value, a, b = 0.6, rng.uniform(0.6, 0.9), rng.uniform(0.6, 0.9)
                cx, cy = rng.uniform(-0.1, 0.1, size=2)
            else:
                value = rng.uniform(-0.3, 0.4)
                a, b = rng.uniform(0.05, 0.35, size=2)
                cx, cy = rng.uniform(-0.5, 0.5, size=2)
            theta = rng.uniform(0.0, np.pi)
            xr = (gx - cx) * np.cos(theta) + (gy - cy) * np.sin(theta)
            yr = -(gx - cx) * np.sin(theta) + (gy - cy) * np.cos(theta)
            image += value * (((xr / a) ** 2 + (yr / b) ** 2) <= 1.0)
        out[index, 0] = np.clip(image, 0.0, 1.0)
    return torch.from_numpy(out.astype(np.float32))
