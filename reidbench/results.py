"""The result store: one JSON file per protocol cell, per-query outcomes beside it.

Layout: ``<root>/<protocol-version>/<dataset>/<model-id>/<attack-id>.json`` (+ ``.npz``).
Files are written atomically (temporary file + rename, the npz before the JSON), so an
interrupted run leaves either a complete cell or none, and a cell whose ``input_key`` is
unchanged is never recomputed. The JSON records the size and sha256 of its ``.npz``
(``per_query_bytes``, ``per_query_sha256``), so a damaged ``.npz`` beside a valid JSON is
caught when it is read (:class:`reidbench.cache.CorruptArtefact`), and the runner computes
that cell again. The ``.npz`` is written byte-reproducibly (fixed zip timestamps), so the
same outcomes give the same hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .cache import CorruptArtefact, atomic_write
from .errors import ReIDBenchError
from .progress import log
from .record import CellRecord, MalformedRecord, PerQueryRef


def cell_path(root: Path, protocol_version: str, dataset: str, model_id: str, attack_id: str) -> Path:
    return Path(root) / protocol_version / dataset / model_id / f"{attack_id}.json"


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez_compressed`` of ``arrays``, but with fixed member timestamps and order, so
    that equal arrays give equal bytes (and equal hashes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arrays[name]), allow_pickle=False)
    return buffer.getvalue()


def write_cell(path: Path, record: CellRecord, per_query: Optional[dict[str, np.ndarray]] = None) -> None:
    path = Path(path)
    if per_query:
        blob = npz_bytes(per_query)
        atomic_write(path.with_suffix(".npz"), blob, check=False)
        record = dataclasses.replace(record, per_query=PerQueryRef(path.with_suffix(".npz").name, len(blob),
                                                                   hashlib.sha256(blob).hexdigest()))
    atomic_write(path, (json.dumps(record.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode(),
                 check=False)


def read_cell(path: Path) -> Optional[CellRecord]:
    """A cell's record, or None (with one warning line) when the file is not a valid record."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log(f"[yellow]warning:[/] skipping malformed result {path}: {exc.__class__.__name__}: {str(exc)[:120]}")
        return None
    try:
        return CellRecord.from_json(data, source=path)
    except MalformedRecord as exc:
        log(f"[yellow]warning:[/] skipping result {exc}")
        return None


def per_query_problem(path: Path, record: Optional[CellRecord] = None) -> Optional[str]:
    """Why the ``.npz`` beside the record at ``path`` is not the one the record was written
    with (missing, other size, other sha256); None when it is, or when the record predates
    those fields. ``record`` defaults to the one at ``path``."""
    npz = Path(path).with_suffix(".npz")
    if record is None:
        try:
            record = CellRecord.from_json(json.loads(Path(path).with_suffix(".json").read_text()), source=path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, MalformedRecord):
            return None
    expected = record.per_query.sha256 if record.per_query is not None else None
    if not isinstance(expected, str):
        return None
    try:
        blob = npz.read_bytes()
    except OSError:
        return "it is missing"
    if record.per_query.bytes is not None and len(blob) != record.per_query.bytes:
        return f"{len(blob)} bytes, its record says {record.per_query.bytes}"
    if hashlib.sha256(blob).hexdigest() != expected:
        return "its sha256 differs from the one its record holds"
    return None


def read_per_query(path: Path, record: Optional[CellRecord] = None) -> dict[str, np.ndarray]:
    """The per-query arrays of the cell at ``path``, checked against its record first; a
    damaged file raises :class:`CorruptArtefact` (one line)."""
    npz = Path(path).with_suffix(".npz")
    problem = per_query_problem(path, record)
    if problem is None:
        try:
            with np.load(npz) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            problem = f"{exc.__class__.__name__}: {str(exc)[:120]}"
    raise CorruptArtefact(f"per-query outcomes {npz} are damaged ({problem})")


def cell_intact(path: Path, record: CellRecord) -> bool:
    """Whether a stored cell can be reused as it is: its per-query file, if it names one, is
    readable and the one it was written with. A damaged one is reported in one line."""
    if record.per_query is None:
        return True
    try:
        read_per_query(path, record)
    except (CorruptArtefact, OSError) as exc:
        log(f"[yellow]warning:[/] {exc}; computing the cell again")
        return False
    return True


@lru_cache(maxsize=4096)
def _outcomes_cached(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
    return read_per_query(Path(path))


def per_query_outcomes(cell_path: str | Path) -> dict[str, np.ndarray]:
    """The per-query arrays beside a record (cached per file version within a process)."""
    npz = Path(cell_path).with_suffix(".npz")
    stat = npz.stat()
    return _outcomes_cached(str(npz), stat.st_mtime_ns, stat.st_size)


def outcomes_or_none(cell_path) -> Optional[dict[str, np.ndarray]]:
    """:func:`per_query_outcomes`, or None when the cell has no readable per-query file."""
    try:
        return per_query_outcomes(cell_path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def iter_cells(root: Path, protocol_version: Optional[str] = None) -> Iterable[tuple[Path, CellRecord]]:
    base = Path(root) / protocol_version if protocol_version else Path(root)
    for path in sorted(base.rglob("*.json")):
        record = read_cell(path)
        if record is not None:
            yield path, record


#: the budget sweep's file (reidbench sweep, reidbench/sweep.py), beside the version folders so that
#: the cell readers above never take it for a cell
BUDGET_FLAG = "budget-sensitive"


def budget_sweep_path(root: Path, protocol_version: str) -> Path:
    return Path(root) / "budget-sweep" / f"{protocol_version}.json"


def read_budget_sweep(root: Path, protocol_version: str, strict: bool = False) -> dict[str, dict]:
    """Per model id, what the budget sweep found (``flag``: Rank-1 kept falling with more
    iterations beyond the interval); empty when the sweep was never run. A malformed file is a
    warning and nothing, or with ``strict`` (a writer about to replace it) a ReIDBenchError."""
    path = budget_sweep_path(root, protocol_version)
    if not path.is_file():
        return {}
    try:
        payload = json.loads(path.read_text())
        models, fingerprint = payload.get("models", {}), payload.get("protocol", {}).get("fingerprint")
        if not isinstance(models, dict):
            raise TypeError("'models' is not a mapping")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as exc:
        if strict:
            raise ReIDBenchError(f"malformed budget sweep {path}: {exc.__class__.__name__}") from None
        log(f"[yellow]warning:[/] skipping malformed budget sweep {path}: {exc.__class__.__name__}")
        return {}
    # A file written before findings carried their own fingerprint holds them under the file's.
    return {m: {"protocol_fingerprint": fingerprint, **f} if isinstance(f, dict) else f for m, f in models.items()}


def sweep_is_current(finding: Optional[dict], weights_sha256: set[str], fingerprints: set[str]) -> bool:
    """Whether a budget-sweep finding was measured on one of these weights under one of these
    protocol fingerprints; one that was not (a retraining or a protocol edit since) is stale and
    never read as the model's."""
    return isinstance(finding, dict) and finding.get("weights_sha256") in weights_sha256 \
        and finding.get("protocol_fingerprint") in fingerprints


def sweep_is_current_for(finding: Optional[dict], records) -> bool:
    """:func:`sweep_is_current` against the weights and fingerprints of a model's cell records
    (false without records)."""
    return sweep_is_current(finding, {r.model.weights_sha256 for r in records},
                            {r.protocol.fingerprint for r in records if r.protocol is not None})
