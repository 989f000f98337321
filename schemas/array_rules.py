"""What an array of an audit must be, stated once: schemas.archive_rules applies it to every
array the gateway reads when a dataset is uploaded and the engine when it reads one (an upload,
a local file of the CLI), so an upload accepted is an upload every audit can read. numpy only
(no torch): the gateway imports it."""

from __future__ import annotations

import numpy as np

MAX_IMAGES = 4096  # images per dataset (also the built-in datasets' `count` limit)


def dtype_problem(dtype: np.dtype) -> str | None:
    """Why arrays of this dtype cannot be used, or None: numbers (or booleans), real-valued."""
    if dtype.hasobject:
        return "holds Python objects; use numeric arrays only"
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        return f"has dtype {dtype}; use numeric arrays"
    if np.issubdtype(dtype, np.complexfloating):
        return f"has complex dtype {dtype}; store (real, imag) as two channels"
    return None


def image_count_problem(count: int) -> str | None:
    if not 1 <= count <= MAX_IMAGES:
        return f"holds {count} images; between 1 and {MAX_IMAGES} are accepted"
    return None
