"""Result records -> the cells frame: one flat row per cell (model × dataset × attack).

Every number a page shows comes from here. A submission's record may carry the submitter's
own numbers beside the measured ones::

    "reported": {"source": "Author et al. 2024, Table 3",        # required, free text
                 "url": "https://arxiv.org/abs/...",             # optional, linked if http(s)
                 "clean": {"rank1": 0.94, "mAP": 0.85},          # fractions, each optional
                 "attacked": {"rank1": 0.31, "mAP": 0.22},       # under this record's attack and ε
                 "footnote": "evaluated without re-ranking"}     # optional, shown as text

A record may hold only ``reported`` (no measured ``clean`` / ``attacked``): it is shown in
the reported columns and never enters a worst case.

Every Rank-1 / mAP / mINP and variance carries its 95% interval (a bootstrap over test
identities, ``metrics/bootstrap.py``), as ``<column>_lo`` / ``<column>_hi``. Records written
before intervals (or per-identity variances) existed get them from their per-query file.
A record the site cannot use is skipped with one warning line.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from rich.markup import escape as markup_escape

from ..checks import interval_settings
from ..metrics import identity_spread, metric_intervals, rank1_variance_interval
from ..progress import log
from ..protocol import CURRENT_VERSION
from ..record import CellRecord, Metrics, Perturbation, ProtocolRef
from ..results import iter_cells, outcomes_or_none


# Table order of threat models; others follow alphabetically.
THREAT_ORDER = {"white-box": 0, "adaptive": 1, "oblivious": 2, "transfer": 3, "query-based": 4}
REPORTED_NUMBERS = ("reported_clean_rank1", "reported_clean_mAP", "reported_rank1", "reported_mAP")

# Flat columns that carry a 95% interval, with the record block and metric it comes from;
# each has <column>_lo / <column>_hi beside it. rr_rank1 / rr_mAP are re-ranked under
# attack: non-adaptive (see the package docstring).
INTERVAL_SOURCES = {"clean_rank1": ("clean", "rank1"), "clean_mAP": ("clean", "mAP"), "rank1": ("attacked", "rank1"),
                    "mAP": ("attacked", "mAP"), "mINP": ("attacked", "mINP"),
                    "rr_clean_rank1": ("clean_reranked", "rank1"), "rr_clean_mAP": ("clean_reranked", "mAP"),
                    "rr_rank1": ("attacked_reranked", "rank1"), "rr_mAP": ("attacked_reranked", "mAP"),
                    "clean_var": ("clean", "rank1_var"), "var": ("attacked", "rank1_var")}
INTERVAL_COLUMNS = [f"{c}_{end}" for c in INTERVAL_SOURCES for end in ("lo", "hi")]

COLUMNS = ["dataset", "split_hash", "model", "backbone", "defense", "train_dataset", "attack", "attack_name", "threat_model",
           "clean_rank1", "clean_mAP", "rank1", "rank5", "rank10", "mAP", "mINP", "rr_clean_rank1", "rr_clean_mAP",
           "rr_rank1", "rr_mAP", "clean_var", "var", "linf", "eps", "perturbed", "flags", "wall_time_s",
           "standardized", "reported_clean_rank1", "reported_clean_mAP", "reported_rank1", "reported_mAP",
           "reported_source", "reported_url", "reported_footnote", *INTERVAL_COLUMNS, "rr_adaptive",
           "weights_sha256", "protocol_version", "protocol_fingerprint", "path"]


def _number(value) -> float:
    """A metric as float; None (not measured) is NaN, anything else not a number is malformed."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _fraction(value) -> float:
    number = _number(value)
    if not (math.isnan(number) or 0.0 <= number <= 1.0):
        raise ValueError(f"expected a fraction in [0, 1], got {value!r}")
    return number


def _reported(record: CellRecord) -> dict:
    block = record.reported
    if block is None:
        return {}
    url = block.url
    out = {"reported_source": block.source,
           "reported_url": url if isinstance(url, str) and re.match(r"^https?://", url) else None,
           "reported_footnote": str(block.footnote or "") or None}
    for numbers, prefix in ((block.clean or {}, "reported_clean_"), (block.attacked or {}, "reported_")):
        for metric in ("rank1", "mAP"):
            out[prefix + metric] = _fraction(numbers.get(metric))
    return out


def _identity_var(record: CellRecord, path: Path, label: str) -> float:
    """Per-identity Rank-1 variance of the ``label`` block; records older than that field get
    it from their per-query outcomes."""
    spread = record.metrics(label).per_identity
    if spread is not None:
        return _number(spread.get("rank1_var"))
    outcomes = outcomes_or_none(path)
    if outcomes is None or "query_pids" not in outcomes or f"{label}_first_hit" not in outcomes:
        return math.nan
    spread = identity_spread(torch.from_numpy(outcomes[f"{label}_first_hit"].astype(np.int64)),
                             torch.from_numpy(outcomes["query_pids"].astype(np.int64)))
    return _number(spread["rank1_var"])


def _bounds(value) -> tuple[float, float]:
    """A stored [lo, hi] pair as fractions-or-numbers; (NaN, NaN) when absent."""
    if value is None:
        return math.nan, math.nan
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"an interval must be [lo, hi], got {value!r}")
    lo, hi = _number(value[0]), _number(value[1])
    if lo > hi:
        raise ValueError(f"an interval must be [lo, hi] with lo <= hi, got {value!r}")
    return lo, hi


def cell_intervals(path: Path, record: CellRecord) -> dict[str, tuple[float, float]]:
    """The 95% interval (lo, hi) of every number of a cell that has one, keyed by its flat
    column (:data:`INTERVAL_SOURCES`): from the record when it stores them (``ci95`` and
    ``per_identity.rank1_var_ci95``), else recomputed from the per-query file with the
    record's protocol settings and seed; (NaN, NaN) where neither can give it (a re-ranked
    number of an old record, mINP of a file without per-query INP)."""
    out: dict[str, tuple[float, float]] = {}
    computed: dict[str, dict] = {}
    settings = dict(interval_settings(str(record.protocol_version)))
    if isinstance(record.seed, int) and not isinstance(record.seed, bool):
        settings["seed"] = record.seed
    for column, (label, metric) in INTERVAL_SOURCES.items():
        block = record.metrics(label)
        if block is None:
            out[column] = (math.nan, math.nan)
            continue
        stored = block.stored_interval(metric)
        if stored is None and label in ("clean", "attacked"):
            if label not in computed:
                computed[label] = _intervals_from_outcomes(path, label, settings)
            stored = computed[label].get(metric)
        out[column] = _bounds(stored)
        if metric in ("rank1", "mAP", "mINP") and not math.isnan(out[column][0]):
            _fraction(out[column][0]), _fraction(out[column][1])
    return out


def _intervals_from_outcomes(path: Path, label: str, settings: dict) -> dict:
    outcomes = outcomes_or_none(path)
    if outcomes is None or "query_pids" not in outcomes or f"{label}_first_hit" not in outcomes:
        return {}
    first_hit, pids = outcomes[f"{label}_first_hit"], outcomes["query_pids"]
    out = metric_intervals(first_hit, pids, outcomes[f"{label}_ap"], outcomes.get(f"{label}_inp"), **settings)
    out["rank1_var"] = rank1_variance_interval(first_hit, pids, **settings)
    return out


def _row(path: Path, record: CellRecord) -> dict:
    """The flat row of one record; TypeError / ValueError when a value is not what it should be."""
    model, dataset = record.model, record.dataset
    measured = record.measured
    reported = _reported(record)
    clean, attacked = record.clean or Metrics(), record.attacked or Metrics()
    clean_rr, attacked_rr = record.clean_reranked or Metrics(), record.attacked_reranked or Metrics()
    perturbation = record.perturbation or Perturbation()
    protocol = record.protocol or ProtocolRef()
    # A query-subset cell is its own dataset on the site: never ranked or combined with full cells.
    subset = dataset.query_subset
    label = dataset.name if not subset else (
        f"{dataset.name} (subset: {int(subset['queries'])} of {int(subset['of'])} queries)")
    row = {
        "dataset": label, "split_hash": str(dataset.split_hash if dataset.split_hash is not None else ""),
        "model": model.id, "backbone": str(model.backbone if model.backbone is not None else ""),
        "defense": model.defense_name,
        # a cross-dataset cell (train on A, test on B) is filed under B; this says A
        "train_dataset": str((model.train_dataset if isinstance(model.train_dataset, dict)
                              else {}).get("name", dataset.name)),
        "attack": record.attack_id, "attack_name": record.attack_name,
        "threat_model": str(record.threat_model if record.threat_model is not None else ""),
        "clean_rank1": _fraction(clean.rank1), "clean_mAP": _fraction(clean.mAP),
        "rank1": _fraction(attacked.rank1), "rank5": _fraction(attacked.rank5),
        "rank10": _fraction(attacked.rank10), "mAP": _fraction(attacked.mAP),
        "mINP": _fraction(attacked.mINP),
        "rr_clean_rank1": _fraction(clean_rr.rank1), "rr_clean_mAP": _fraction(clean_rr.mAP),
        "rr_rank1": _fraction(attacked_rr.rank1), "rr_mAP": _fraction(attacked_rr.mAP),
        "clean_var": _identity_var(record, path, "clean") if measured else math.nan,
        "var": _identity_var(record, path, "attacked") if measured else math.nan,
        "linf": _number(perturbation.linf_max), "eps": _number(perturbation.eps),
        "perturbed": str(record.perturbed if record.perturbed is not None else "query"),
        "flags": ", ".join(str(f) for f in record.sanity_flags),
        "wall_time_s": _number(record.wall_time_s), "standardized": measured, "path": str(path),
        "rr_adaptive": bool(attacked_rr.adaptive) if record.attacked_reranked is not None else None,
        "weights_sha256": str(model.weights_sha256 or ""),
        "protocol_version": str(protocol.version or ""),
        "protocol_fingerprint": str(protocol.fingerprint or ""),
    }
    if measured:
        for column, (lo, hi) in cell_intervals(path, record).items():
            row[f"{column}_lo"], row[f"{column}_hi"] = lo, hi
    row.update({key: reported.get(key, math.nan if key in REPORTED_NUMBERS else None)
                for key in COLUMNS if key.startswith("reported_")})
    return row


def load_records(results_root: Path, protocol_version: str = CURRENT_VERSION) -> list[tuple[Path, CellRecord, dict]]:
    """(path, record, flat row) of every usable record of one protocol version; a record the
    site cannot use is skipped with one warning line."""
    out = []
    for path, record in iter_cells(results_root, protocol_version):
        if record.protocol_version != protocol_version:
            continue  # never mix protocol versions in one table
        try:
            row = _row(path, record)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log(f"[yellow]warning:[/] skipping result {markup_escape(str(path))}: malformed record "
                f"({exc.__class__.__name__}: {markup_escape(str(exc)[:120])})")
            continue
        out.append((path, record, row))
    return out


def results_table(results_root: Path, protocol_version: str = CURRENT_VERSION) -> pd.DataFrame:
    """One row per cell (model × dataset × attack), flat columns."""
    rows = [row for _, _, row in load_records(results_root, protocol_version)]
    return cells_frame(rows)


def cells_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["dataset", "model", "attack"], kind="stable").reset_index(drop=True)


def is_missing(value) -> bool:
    """Whether a number of the cells frame was not measured (None or NaN)."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def to_eps255(eps: float) -> Optional[float]:
    return None if is_missing(eps) else round(eps * 255, 3)


def threat_key(threat_model: str, perturbed: str) -> str:
    return threat_model if perturbed == "query" else f"{threat_model}, {perturbed} perturbed"


def threat_order(key: str) -> tuple:
    base = key.split(",")[0]
    return ("," in key, THREAT_ORDER.get(base, len(THREAT_ORDER)), key)
