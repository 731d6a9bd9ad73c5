"""One place that decides how progress is shown (rich bars on a terminal, quiet otherwise)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def _quiet() -> bool:
    return os.environ.get("REIDBENCH_QUIET") == "1"


#: the run's overall display while :func:`run_progress` is open: rich shows one live display
#: at a time, so every bar opened meanwhile becomes a task of this one
_RUN_DISPLAY: Optional[Progress] = None


class _LineProgress(Progress):
    """The display where stderr is not a terminal (a log file, CI, ``nohup``): rich draws nothing
    live there, so a half-hour cell would leave its log silent. Each visible task writes a line
    when it crosses a tenth of its total, at most once per ``interval_s``, and one when it ends.
    A task added with ``lines=False`` stays silent (training writes its own line per epoch)."""

    interval_s = 60.0

    def __init__(self, *columns, **kwargs):
        super().__init__(*columns, **kwargs)
        self._written = {}  # task id -> (tenths reported, time of its last line)

    # No live display at all: off a terminal it draws nothing and leaves a blank line when it stops.
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._line(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def _line(self, task_id) -> None:
        if self.disable:
            return
        task = next((t for t in self.tasks if t.id == task_id), None)
        if task is None or not task.visible or not task.total or not task.fields.get("lines", True):
            return
        tenths, last = self._written.get(task_id, (0, task.start_time or time.monotonic()))
        now_tenths = int(10 * min(task.completed, task.total) // task.total)
        if task.finished:
            if tenths < 10:
                self._written[task_id] = (10, time.monotonic())
                log(f"{task.description}: {task.completed:g}/{task.total:g} done in {_clock(task.elapsed)}")
            return
        if now_tenths > tenths and time.monotonic() - last >= self.interval_s:
            self._written[task_id] = (now_tenths, time.monotonic())
            left = task.time_remaining
            log(f"{task.description}: {task.completed:.0f}/{task.total:g} ({task.percentage:.0f}%), "
                f"{_clock(task.elapsed)} elapsed" + (f", ~{_clock(left)} left" if left is not None else ""))


def _clock(seconds: Optional[float]) -> str:
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _display(enabled: bool) -> Progress:
    kind = Progress if console.is_terminal else _LineProgress
    return kind(
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
