"""Forward operators A built from an audit's `operator` config, on deepinv physics.

Every operator is a `LinearOperator` (the `Operator` protocol of workers.engine.context): deepinv
does the maths with its noise never used (the engine adds its own seeded noise), and an optional
0/1 `mask` in measurement space says which entries are real measurements. See docs/operators.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import deepinv as dinv
import numpy as np
import torch
from deepinv.physics.functional import gaussian_blur

from schemas import operators as ops
from schemas.common import FileArray, UploadedArray
from workers.engine.masks import line_mask, radial_mask, variable_density_mask
from workers.shared.arrays import load_array_ref
from workers.shared.errors import EngineInputError

# Dense Gaussian matrices cost m·n floats: cap them at 64 MiB (float32).
MAX_MATRIX_ENTRIES = 2**24


@dataclass
class LinearOperator:
    """A deepinv linear physics plus the measurement-space conventions the checks share."""

    kind: str
    image_shape: tuple[int, int, int]
    measurement_shape: tuple[int, ...]
    physics: dinv.physics.LinearPhysics
    mask: torch.Tensor | None = None  # broadcasts against [B, *measurement_shape]
    # MRI on real 1-channel images: x enters as (x, 0); the adjoint keeps the real part, which
    # is the exact adjoint of the operator restricted to real images.
    real_into_complex: bool = False

    def A(self, x: torch.Tensor) -> torch.Tensor:
        if self.real_into_complex:
            x = torch.cat([x, torch.zeros_like(x)], dim=1)
        return self.physics.A(x)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        x = self.physics.A_adjoint(y)
        return x[:, :1] if self.real_into_complex else x

    def project(self, e: torch.Tensor) -> torch.Tensor:
        return e if self.mask is None else e * self.mask

    def norm(self, y: torch.Tensor) -> torch.Tensor:
        return self.project(y).flatten(1).norm(dim=1)

    @property
    def measured_entries(self) -> int:
        """How many entries of one measurement are real measurements."""
        if self.mask is None:
            return int(np.prod(self.measurement_shape))
        full = torch.ones(self.measurement_shape, device=self.mask.device)
        return int((full * self.mask).sum())


def build_operator(
    config: ops.Operator,
    image_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
    base_dir: Path | None = None,
) -> LinearOperator:
    """The operator of `config` for images of `image_shape` ([C, H, W]) on `device`.

    Everything random (masks, matrices) is drawn on the CPU from the config's seed, so the same
    config gives the same operator on every device."""
    builders = {
        "mri": _mri,
        "radon": _radon,
        "gaussian": _gaussian,
        "inpainting": _inpainting,
        "blur": _blur,
        "denoising": _denoising,
    }
    builder = builders.get(config.kind)
    if builder is None:
        raise EngineInputError(f"unknown operator kind {config.kind!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepinv's deprecation chatter at construction
        physics, mask, real_into_complex = builder(config, image_shape, base_dir)  # type: ignore[operator]
    physics = physics.to(torch.device(device))
    if mask is not None:
        mask = mask.to(torch.device(device))
    operator = LinearOperator(
        kind=config.kind,
        image_shape=image_shape,
        measurement_shape=(),
        physics=physics,
        mask=mask,
        real_into_complex=real_into_complex,
    )
    probe = torch.zeros((1, *image_shape), device=torch.device(device))
    operator.measurement_shape = tuple(operator.A(probe).shape[1:])
    return operator


Built = tuple[dinv.physics.LinearPhysics, torch.Tensor | None, bool]


def _binary_mask(ref: FileArray | UploadedArray, base_dir: Path | None, what: str) -> torch.Tensor:
    array = load_array_ref(ref, base_dir)
    if not np.isin(array, (0, 1)).all():
        raise EngineInputError(f"{what}: the mask must hold only 0 and 1")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _mri(config: ops.MRIOperator, shape: tuple[int, int, int], base_dir: Path | None) -> Built:
    channels, height, width = shape
    if channels not in (1, 2):
        raise EngineInputError(
            f"mri: images must have 2 channels (real, imaginary) or 1 real channel, not {channels}"
        )
    if isinstance(config.mask, str):
        a, cf, seed = config.acceleration, config.center_fraction, config.seed
        if config.mask == "cartesian":
            mask = line_mask(height, width, a, cf, seed, random=False)
        elif config.mask == "random_lines":
            mask = line_mask(height, width, a, cf, seed, random=True)
        elif config.mask == "variable_density":
            mask = variable_density_mask(height, width, a, cf, seed)
        else:
            mask = radial_mask(height, width, a, seed)
    else:
        mask = _binary_mask(config.mask, base_dir, "mri mask")
        if mask.dim() == 3 and mask.shape[0] in (1, 2):
            mask = mask[0]
        if tuple(mask.shape) != (height, width):
            raise EngineInputError(
                f"mri mask: shape {list(mask.shape)} does not match the image size "
                f"[{height}, {width}]"
            )
    if mask.sum() == 0:
        raise EngineInputError("mri mask: no k-space entry is sampled")
    physics = dinv.physics.MRI(mask=mask, img_size=(2, height, width))
    # k-space is [2, H, W] (real, imaginary): the same mask applies to both parts.
    return physics, mask.expand(2, height, width).clone(), channels == 1


def _radon(config: ops.RadonOperator, shape: tuple[int, int, int], base_dir: Path | None) -> Built:
    _, height, width = shape
    if height != width:
        raise EngineInputError(f"radon: images must be square, not {height}×{width}")
    angles = config.angles if isinstance(config.angles, int) else list(config.angles)
    # normalize=True scales A to unit spectral norm, so measurement-space Lipschitz constants
    # do not depend on the detector's arbitrary scale.
    physics = dinv.physics.Tomography(angles=angles, img_width=width, circle=False, normalize=True)
    return physics, None, False


def _gaussian(
    config: ops.GaussianOperator, shape: tuple[int, int, int], base_dir: Path | None
) -> Built:
    n = int(np.prod(shape))
    if config.matrix is not None:
        array = load_array_ref(config.matrix, base_dir)
        if array.ndim != 2 or array.shape[1] != n:
            raise EngineInputError(
                f"gaussian: the matrix must be [m, {n}] for images {list(shape)}, "
                f"not {list(array.shape)}"
            )
        if array.size > MAX_MATRIX_ENTRIES:
            raise EngineInputError(
                f"gaussian: the matrix has more than {MAX_MATRIX_ENTRIES} entries"
            )
        return MatrixPhysics(torch.from_numpy(array.astype(np.float32)), shape), None, False
    assert config.m is not None  # the schema asks for exactly one of m and matrix
    if config.m * n > MAX_MATRIX_ENTRIES:
        raise EngineInputError(
            f"gaussian: m·n = {config.m}·{n} exceeds {MAX_MATRIX_ENTRIES} matrix entries; "
            "use fewer measurements or smaller images"
        )
    physics = dinv.physics.CompressedSensing(
        m=config.m, img_size=shape, rng=torch.Generator("cpu").manual_seed(config.seed)
    )
    return physics, None, False


class MatrixPhysics(dinv.physics.LinearPhysics):
    """y = M vec(x) for an explicit [m, n] matrix M."""

    def __init__(self, matrix: torch.Tensor, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.image_shape = image_shape
        self.register_buffer("matrix", matrix)

    def A(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return x.flatten(1) @ self.matrix.T

    def A_adjoint(self, y: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return (y @ self.matrix).view(-1, *self.image_shape)


def _inpainting(
    config: ops.InpaintingOperator, shape: tuple[int, int, int], base_dir: Path | None
) -> Built:
    channels, height, width = shape
    if config.mask is not None:
        pixels = _binary_mask(config.mask, base_dir, "inpainting mask")
        if pixels.dim() == 2:
            pixels = pixels.expand(channels, height, width).clone()
        if tuple(pixels.shape) != shape:
            raise EngineInputError(
                f"inpainting mask: shape {list(pixels.shape)} matches neither [H, W] "
                f"nor {list(shape)}"
            )
    else:
        # exactly round(fraction·H·W) pixels kept, the same in every channel
        kept = max(1, round(config.fraction * height * width))
        order = torch.randperm(height * width, generator=torch.Generator().manual_seed(config.seed))
        flat = torch.zeros(height * width)
        flat[order[:kept]] = 1.0
        pixels = flat.view(1, height, width).expand(channels, height, width).clone()
    physics = dinv.physics.Inpainting(img_size=shape, mask=pixels)
    return physics, pixels, False


def _blur(config: ops.BlurOperator, shape: tuple[int, int, int], base_dir: Path | None) -> Built:
    _, height, width = shape
    if isinstance(config.kernel, str):
        if config.kernel == "gaussian":
            sigma = (config.sigma, config.sigma)
            kernel = gaussian_blur(psf_size=(config.size, config.size), sigma=sigma)
        else:
            kernel = torch.full((config.size, config.size), 1.0 / config.size**2)
    else:
        kernel = torch.from_numpy(load_array_ref(config.kernel, base_dir).astype(np.float32))
        if kernel.dim() != 2:
            raise EngineInputError(f"blur kernel: must be a 2-D array, not {list(kernel.shape)}")
    kernel = kernel.reshape(1, 1, *kernel.shape[-2:])
    if kernel.shape[-2] > height or kernel.shape[-1] > width:
        raise EngineInputError(
            f"blur kernel: {list(kernel.shape[-2:])} is larger than the images [{height}, {width}]"
        )
    # circular convolution by FFT: an exact adjoint and no boundary rows to account for
    return dinv.physics.BlurFFT(img_size=shape, filter=kernel), None, False


def _denoising(
    config: ops.DenoisingOperator, shape: tuple[int, int, int], base_dir: Path | None
) -> Built:
    return dinv.physics.Denoising(), None, False
