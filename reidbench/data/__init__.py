"""Datasets: every builder is registered in ``DATASETS`` and returns a :class:`ReIDSplit`.

``build_dataset(name, **options)`` is the one entry point the engine uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ..cache import cache_dir
from ..errors import ReIDBenchError
from ..registry import DATASETS
from .files import data_roots
from .split import (DIRECTIONS, MODALITIES, ReIDSplit, ReIDSubset, TrackletSubset, concat_subsets,
                    cross_modality_direction, read_image, resize_uint8)

__all__ = ["DATASETS", "ReIDSplit", "ReIDSubset", "TrackletSubset", "MODALITIES", "DIRECTIONS", "build_dataset",
           "concat_subsets", "dataset_spec", "training_options", "data_roots", "cache_dir", "read_image", "resize_uint8"]

#: dataset options that change only how the test samples are queried, never the training data
EVALUATION_ONLY_OPTIONS = ("direction",)


def build_dataset(name: str, root: Optional[str | Path] = None, direction: Optional[str] = None,
                  **options) -> ReIDSplit:
    """Build a registered dataset by name. ``root`` overrides the dataset folder search;
    ``direction`` (cross-modality datasets) picks which modality queries which, see
    :func:`cross_modality_direction`."""
    builder = DATASETS.get(name)
    split = builder(root=Path(root) if root is not None else None, **options)
    return split if direction is None else cross_modality_direction(split, direction)


def dataset_spec(value: Union[str, dict], where: str) -> dict:
    """A dataset as the engine takes it, ``{"name": ..., **options}``, from what a user wrote:
    a registered name, a mapping with a ``name`` (as in a zoo entry), or that mapping written
    as YAML text (``'{name: synthetic, preset: tiny}'``, how a command line passes it).
    ``where`` names the argument in the one-line error."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ReIDBenchError(f"{where} {value!r} is neither a dataset name nor a YAML mapping") from None
    if isinstance(value, str):
        spec = {"name": value}
    elif isinstance(value, dict) and isinstance(value.get("name"), str):
        spec = dict(value)
    else:
        raise ReIDBenchError(f"{where} must be a dataset name or a mapping with a 'name', got {value!r}")
    DATASETS.get(spec["name"])
    return spec


def training_options(dataset: dict) -> dict:
    """A dataset spec without its evaluation-only options: two specs with the same training
    options train the same model."""
    return {k: v for k, v in dataset.items() if k not in EVALUATION_ONLY_OPTIONS}


# Importing the modules registers their builders.
from . import market, msmt17, synthetic  # noqa: E402,F401
from . import crossmodal, synthetic_vi  # noqa: E402,F401
