"""A secret generated on first use into a file of the data directory, shared by every process
that reads that directory: the first creates it (0600, in a 0700 directory), the others read
what it wrote."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def generated_secret(path: Path, generate: Callable[[], str]) -> str | None:
    """The file's text, stripped; created with `generate()` if no process has made it yet.
    None if it stays empty (a writer that died between creating and writing it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(generate())
    for _ in range(50):  # another process may be between creating the file and writing it
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
        time.sleep(0.01)
    return None
