"""One place that decides how progress is shown (rich bars on a terminal, quiet otherwise)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def _quiet() -> bool:
    return os.environ.get("REIDBENCH_QUIET") == "1"


#: the run's overall display while :func:`run_progress` is open: rich shows one live display
#: at a time, so every bar opened meanwhile becomes a task of this one
_RUN_DISPLAY: Optional[Progress] = None


def _display(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled or _quiet(),
        transient=not sys.stderr.isatty(),
    )


class _Tasks:
    """A bar's view of the shared display: its tasks appear below the overall one and are
    removed when the bar closes (a hidden task when the bar is disabled)."""

    def __init__(self, display: Progress, enabled: bool):
        self._display, self._enabled, self._tasks = display, enabled, []

    def add_task(self, description: str, **fields):
        task = self._display.add_task(description, visible=self._enabled, **fields)
        self._tasks.append(task)
        return task

    def __getattr__(self, name):  # update, advance, ...: the display's own
        return getattr(self._display, name)

    def close(self) -> None:
        for task in self._tasks:
            self._display.remove_task(task)


@contextlib.contextmanager
def progress_bar(enabled: bool = True):
    """A rich progress bar writing to stderr; a no-op bar when disabled or REIDBENCH_QUIET=1.
    Inside :func:`run_progress` its tasks join the run's display, below the overall bar."""
    if _RUN_DISPLAY is not None:
        tasks = _Tasks(_RUN_DISPLAY, enabled)
        try:
            yield tasks
        finally:
            tasks.close()
        return
    with _display(enabled) as bar:
        yield bar


@contextlib.contextmanager
def run_progress(total: int, description: str = "cells", enabled: bool = True):
    """One overall bar for a whole run (``total`` units done so far, elapsed, ETA) above every
    bar opened while it is open. Yields ``advance(n=1)``. Nested, it leaves the outer one."""
    global _RUN_DISPLAY
    if _RUN_DISPLAY is not None:
        yield lambda n=1: None
        return
    with _display(enabled) as display:
        task = display.add_task(description, total=total)
        _RUN_DISPLAY = display
        try:
            yield lambda n=1: display.advance(task, n)
        finally:
            _RUN_DISPLAY = None


def log(message: str) -> None:
    if not _quiet():
        console.print(message, soft_wrap=True)  # one message, one line, whatever the width
