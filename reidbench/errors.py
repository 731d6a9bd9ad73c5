"""User-facing errors.

Anything a user can cause (a bad path, an unknown name, a malformed file) raises
:class:`ReIDBenchError`. The CLI prints its message as one line and exits non-zero;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ReIDBenchError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> ReIDBenchError:
    """Build the error for an unknown registry key, suggesting the closest known name."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    listing = ", ".join(known) if len(known) <= 12 else ", ".join(known[:12]) + ", ..."
    return ReIDBenchError(f"unknown {kind} '{name}'{hint} (known: {listing})")


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of a library's exception message, for a one-line report."""
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:limit]
