"""Progress display: a rich progress bar on a terminal, sparse plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressSink(Protocol):
    def update(self, fraction: float, description: str) -> None: ...


class _PlainSink:
    """For logs and CI: one line when the description changes or every 10 %."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._last: tuple[int, str] | None = None
        self._since = 0.0

    def update(self, fraction: float, description: str) -> None:
        key = (int(fraction * 10), description)
        if key != self._last or time.monotonic() - self._since > 30:
            self._console.print(f"[{fraction:5.1%}] {description}", highlight=False)
            self._last = key
            self._since = time.monotonic()


class _BarSink:
    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task = progress.add_task("starting", total=1.0)

    def update(self, fraction: float, description: str) -> None:
        self._progress.update(self._task, completed=fraction, description=description)


@contextmanager
def progress_display(console: Console | None = None, quiet: bool = False) -> Iterator[ProgressSink]:
    console = console or Console(stderr=True)
    if quiet or not sys.stderr.isatty():
        yield _PlainSink(console)
        return
    columns = (
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f} %"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield _BarSink(progress)


def describe(status: dict) -> str:
    """A one-line description of an audit status from the API."""
    progress = status.get("progress") or {}
    parts = [status.get("status", "?")]
    if progress.get("current_check"):
        parts.append(str(progress["current_check"]))
    if progress.get("message"):
        parts.append(str(progress["message"]))
    return " · ".join(parts)
