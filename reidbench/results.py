"""The result store: one JSON file per protocol cell, per-query outcomes beside it.

Layout: ``<root>/<protocol-version>/<dataset>/<model-id>/<attack-id>.json`` (+ ``.npz``).
Files are written atomically (temporary file + rename, the npz before the JSON), so an
interrupted run leaves either a complete cell or none, and a cell whose ``input_key`` is
unchanged is never recomputed.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .progress import log


def cell_path(root: Path, protocol_version: str, dataset: str, model_id: str, attack_id: str) -> Path:
    return Path(root) / protocol_version / dataset / model_id / f"{attack_id}.json"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_cell(path: Path, record: dict, per_query: Optional[dict[str, np.ndarray]] = None) -> None:
    if per_query:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **per_query)
        _atomic_write_bytes(path.with_suffix(".npz"), buffer.getvalue())
        record = {**record, "per_query_file": path.with_suffix(".npz").name}
    _atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def read_cell(path: Path) -> Optional[dict]:
    """A cell's record, or None (with one warning line) when the file is not a valid record."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log(f"[yellow]warning:[/] skipping malformed result {path}: {exc.__class__.__name__}: {str(exc)[:120]}")
        return None
    if not isinstance(record, dict) or "model" not in record or "attack" not in record:
        log(f"[yellow]warning:[/] skipping result {path}: not a reidbench record")
        return None
    return record


def read_per_query(path: Path) -> dict[str, np.ndarray]:
    with np.load(Path(path).with_suffix(".npz")) as data:
        return {k: data[k] for k in data.files}


def iter_cells(root: Path, protocol_version: Optional[str] = None) -> Iterable[tuple[Path, dict]]:
    base = Path(root) / protocol_version if protocol_version else Path(root)
    for path in sorted(base.rglob("*.json")):
        record = read_cell(path)
        if record is not None:
            yield path, record


#: the budget sweep's file (benchmarks/attack_budget.py), beside the version folders so that
#: the cell readers above never take it for a cell
BUDGET_FLAG = "budget-sensitive"


def budget_sweep_path(root: Path, protocol_version: str) -> Path:
    return Path(root) / "budget-sweep" / f"{protocol_version}.json"


def read_budget_sweep(root: Path, protocol_version: str) -> dict[str, dict]:
    """Per model id, what the budget sweep found (``flag``: Rank-1 kept falling with more
    iterations beyond the interval); empty when the sweep was never run."""
    path = budget_sweep_path(root, protocol_version)
    if not path.is_file():
        return {}
    try:
        models = json.loads(path.read_text()).get("models", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        log(f"[yellow]warning:[/] skipping malformed budget sweep {path}: {exc.__class__.__name__}")
        return {}
    return models if isinstance(models, dict) else {}
