"""Labelled images for classifier audits: the built-in `digits` set (workers.engine.digits) and
labels from `.npz` files, checked against the model's number of classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from schemas.archive_rules import DEFAULT_LABELS_KEY, InputRefused, labels_summary
from schemas.datasets import BuiltinDataset, DatasetRef, FileDataset
from workers.engine.digits import digits
from workers.engine.ground_truth import load_images
from workers.shared.arrays import load_array, resolve_path
from workers.shared.errors import EngineInputError


def load_labelled(
    ref: DatasetRef, base_dir: Path | None, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, C, H, W] (as `datasets.load_images` gives them) and class labels [N] (int64)
    of a classifier audit's dataset, the labels checked against `num_classes`."""
    if isinstance(ref, BuiltinDataset):
        if ref.builtin != "digits":
            raise EngineInputError(
                f"built-in dataset {ref.builtin!r} has no labels; a classifier audit needs "
                "labelled images: use {'builtin': 'digits'} or an .npz with `images` and `labels`"
            )
        images, labels = digits(ref.count, ref.size, ref.seed)
    elif isinstance(ref, FileDataset):
        images = load_images(ref, base_dir)
        labels = _file_labels(ref, base_dir, images.shape[0])
    else:
        raise EngineInputError("the dataset was not resolved to a file before the audit")
    return images, check_labels(labels, num_classes, images.shape[0])


def _file_labels(ref: FileDataset, base_dir: Path | None, count: int) -> torch.Tensor:
    if resolve_path(ref.file, base_dir).suffix != ".npz":
        raise EngineInputError(
            f"{ref.file}: a classifier audit needs labels: upload an .npz with arrays "
            "`images` and `labels`"
        )
    key = ref.labels_key or DEFAULT_LABELS_KEY
    array = load_array(ref.file, key, base_dir)
    try:
        labels_summary(key, array, count)  # the gateway's rule for labels at upload
    except InputRefused as exc:
        raise EngineInputError(f"{ref.file}: {exc.reason}") from None
    return torch.from_numpy(array.astype(np.int64))


def check_labels(labels: torch.Tensor, num_classes: int, count: int | None = None) -> torch.Tensor:
    if count is not None and labels.shape[0] != count:
        raise EngineInputError(f"{labels.shape[0]} labels for {count} images")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise EngineInputError(
            f"labels must lie in [0, {num_classes}) (the model's num_classes); found "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    return labels
