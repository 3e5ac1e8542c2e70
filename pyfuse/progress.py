"""Progress bars for long work (rich), quiet when stderr is not a terminal
unless PYFUSE_PROGRESS=1, and always quiet under PYFUSE_PROGRESS=0."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True)


def enabled() -> bool:
    flag = os.environ.get("PYFUSE_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false")
    return sys.stderr.isatty()


# Bars open now: rich shows one live display at a time, so a bar opened inside
# another (a fuse inside `pyfuse fuse --compare-policies`) stays silent.
_open = 0


@contextmanager
def progress_bar():
    """A rich Progress (or a no-op stand-in) for ``add_task``/``advance``;
    the stand-in too inside another bar."""
    global _open
    if not enabled() or _open:
        yield _Silent()
        return
    _open += 1
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                      transient=False) as progress:
            yield progress
    finally:
        _open -= 1


def track(iterable, description: str, total: int | None = None):
    """Iterate with a progress bar."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress_bar() as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)


class _Silent:
    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass
