"""Datasets: every builder is registered in ``DATASETS`` and returns a :class:`ReIDSplit`.

``build_dataset(name, **options)`` is the one entry point the engine uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..registry import DATASETS
from .split import ReIDSplit, ReIDSubset, concat_subsets, read_image, resize_uint8

__all__ = ["DATASETS", "ReIDSplit", "ReIDSubset", "build_dataset", "concat_subsets", "data_roots", "cache_dir", "read_image", "resize_uint8"]


def cache_dir() -> Path:
    """Where generated data, decoded images and trained weights are cached."""
    return Path(os.environ.get("REIDBENCH_CACHE", Path.home() / ".cache" / "reidbench")).expanduser()


def data_roots() -> list[Path]:
    """Folders searched for real datasets, in order: $REIDBENCH_DATA, ./data, ../shared/data."""
    roots = []
    if os.environ.get("REIDBENCH_DATA"):
        roots.append(Path(os.environ["REIDBENCH_DATA"]).expanduser())
    roots += [Path.cwd() / "data", Path.cwd().parent / "shared" / "data"]
    return roots


def build_dataset(name: str, root: Optional[str | Path] = None, **options) -> ReIDSplit:
    """Build a registered dataset by name. ``root`` overrides the dataset folder search."""
    builder = DATASETS.get(name)
    return builder(root=Path(root) if root is not None else None, **options)


# Importing the modules registers their builders.
from . import market, synthetic  # noqa: E402,F401
