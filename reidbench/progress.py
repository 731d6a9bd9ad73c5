"""One place that decides how progress is shown (rich bars on a terminal, quiet otherwise)."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def _quiet() -> bool:
    return os.environ.get("REIDBENCH_QUIET") == "1"


@contextlib.contextmanager
def progress_bar(enabled: bool = True):
    """A rich progress bar writing to stderr; a no-op bar when disabled or REIDBENCH_QUIET=1."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled or _quiet(),
        transient=not sys.stderr.isatty(),
    )
    with bar:
        yield bar


def log(message: str) -> None:
    if not _quiet():
        console.print(message, soft_wrap=True)  # one message, one line, whatever the width
