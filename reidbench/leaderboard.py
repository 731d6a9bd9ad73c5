"""The leaderboard: a pure function from a folder of result records to a static HTML site.

Same records in, same bytes out: rows, columns and files are sorted, nothing depends on
the time or the machine that renders. The site opens from ``file://`` without a network:
templates live in ``leaderboard/templates``, the small CSS and JavaScript (sorting and
filtering) in ``leaderboard/static`` and are copied beside the pages; plots are SVG drawn
here, images are inline PNG. jinja2 autoescaping is on, so a model name or a footnote
holding HTML renders as text, and a model id becomes a file name only after sanitizing.

Layout of ``out_dir``::

    index.html               one summary per dataset × ε, then one table per threat model
    models/<model>.html      per model: every cell, robustness vs ε, an example query, provenance
    tables/<table>.csv|json  every table of the site, as numbers (fractions, as in the records)
    models/<model>.csv|json  the model page's table
    cells.csv|json           every cell, flat
    assets/                  site.css, site.js

Three kinds of numbers stay in separate columns, as on RobustBench (Croce et al. 2021):
*reported* -- what a submitter claims, from an optional ``reported`` block of a record
(below); *standardized* -- measured by our runner under the protocol's attack grid;
*adaptive* -- the per-query worst case over every attack run on the model, the grid plus
variants outside it (``eot``, ``bpda``, ``oblivious``, extra attacks), shown only for
models that have such cells. A submission's record carries::

    "reported": {"source": "Author et al. 2024, Table 3",        # required, free text
                 "url": "https://arxiv.org/abs/...",             # optional, linked if http(s)
                 "clean": {"rank1": 0.94, "mAP": 0.85},          # fractions, each optional
                 "attacked": {"rank1": 0.31, "mAP": 0.22},       # under this record's attack and ε
                 "footnote": "evaluated without re-ranking"}     # optional, shown as text

A record may hold only ``reported`` (no measured ``clean`` / ``attacked``): it is shown in
the reported columns and never enters a worst case.

Per-identity variance (DDID's bias measure, ``metrics/fairness.py``) is shown clean and
under the per-query worst case of the same attacks as the table's worst-case columns: a
query counts as a hit only if every one of those attacks leaves its first match on top.

Every Rank-1 / mAP / mINP and variance carries its 95% interval (a bootstrap over test
identities, ``metrics/bootstrap.py``): shown as ``61.9 ± 4.1`` (half the interval's width;
the bounds are in the cell's tooltip), and as ``<column>.lo`` / ``<column>.hi`` in the
downloads. Records written before intervals existed get them from their per-query file.

A worst case combines only cells that agree on the weights' sha256, the split hash and the
protocol fingerprint (the largest such group of the model; none when two groups tie); the
others are stale, listed in the row's flags and left out. Re-ranked numbers under attack are
non-adaptive (the attacks optimise plain distances): they appear only on the model pages,
labelled so, never in a headline or worst-case column.

Each protocol version is rendered apart: the requested one (the current by default) at the
top of ``out_dir``, every other version found in the result folder under
``out_dir/protocol-<version>/``, each page saying so; numbers of two versions never share a table.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

from collections import Counter

import numpy as np
import pandas as pd
import torch
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from rich.markup import escape as markup_escape

from .errors import ReIDBenchError
from .metrics import IdentityBootstrap, identity_spread, metric_intervals, rank1_variance_interval
from .progress import log
from .protocol import CURRENT_VERSION, known_versions, load_protocol
from .results import BUDGET_FLAG, iter_cells, read_budget_sweep, read_per_query

# Templates and assets ship inside the package (a symlink to the repository's leaderboard/ in a
# checkout), so an installed reidbench renders without a clone.
LEADERBOARD_DIR = Path(__file__).resolve().parent / "bundled" / "leaderboard"
# The rendered site is the user's, like the results: relative to the working directory.
DEFAULT_SITE = Path("leaderboard") / "site"

# Table order of threat models; others follow alphabetically.
THREAT_ORDER = {"white-box": 0, "adaptive": 1, "oblivious": 2, "transfer": 3, "query-based": 4}
# Colours of the robustness-vs-ε series (Tableau 10); further series repeat them dashed.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
REPORTED_NUMBERS = ("reported_clean_rank1", "reported_clean_mAP", "reported_rank1", "reported_mAP")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")

# Flat columns that carry a 95% interval, with the record block and metric it comes from;
# each has <column>_lo / <column>_hi beside it. rr_rank1 / rr_mAP are re-ranked under
# attack: non-adaptive (see the module docstring).
INTERVAL_SOURCES = {"clean_rank1": ("clean", "rank1"), "clean_mAP": ("clean", "mAP"), "rank1": ("attacked", "rank1"),
                    "mAP": ("attacked", "mAP"), "mINP": ("attacked", "mINP"),
                    "rr_clean_rank1": ("clean_reranked", "rank1"), "rr_clean_mAP": ("clean_reranked", "mAP"),
                    "rr_rank1": ("attacked_reranked", "rank1"), "rr_mAP": ("attacked_reranked", "mAP"),
                    "clean_var": ("clean", "rank1_var"), "var": ("attacked", "rank1_var")}
INTERVAL_COLUMNS = [f"{c}_{end}" for c in INTERVAL_SOURCES for end in ("lo", "hi")]
# What a worst case must not mix (the row's columns).
CONSISTENCY = ("weights_sha256", "split_hash", "protocol_fingerprint")

COLUMNS = ["dataset", "split_hash", "model", "backbone", "defense", "train_dataset", "attack", "attack_name", "threat_model",
           "clean_rank1", "clean_mAP", "rank1", "rank5", "rank10", "mAP", "mINP", "rr_clean_rank1", "rr_clean_mAP",
           "rr_rank1", "rr_mAP", "clean_var", "var", "linf", "eps", "perturbed", "flags", "wall_time_s",
           "standardized", "reported_clean_rank1", "reported_clean_mAP", "reported_rank1", "reported_mAP",
           "reported_source", "reported_url", "reported_footnote", *INTERVAL_COLUMNS, "rr_adaptive",
           "weights_sha256", "protocol_version", "protocol_fingerprint", "path"]


# --- records -> one flat row per cell ------------------------------------------------------
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


def _reported(record: dict) -> dict:
    block = record.get("reported")
    if block is None:
        return {}
    if not isinstance(block, dict) or not isinstance(block.get("source"), str) or not block["source"].strip():
        raise ValueError("'reported' needs a non-empty 'source'")
    url = block.get("url")
    out = {"reported_source": block["source"],
           "reported_url": url if isinstance(url, str) and re.match(r"^https?://", url) else None,
           "reported_footnote": str(block.get("footnote") or "") or None}
    for part, prefix in (("clean", "reported_clean_"), ("attacked", "reported_")):
        numbers = block.get(part) or {}
        if not isinstance(numbers, dict):
            raise ValueError(f"'reported.{part}' must be an object")
        for metric in ("rank1", "mAP"):
            out[prefix + metric] = _fraction(numbers.get(metric))
    return out


@lru_cache(maxsize=4096)
def _outcomes_cached(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
    return read_per_query(Path(path))


def per_query_outcomes(cell_path: str | Path) -> dict[str, np.ndarray]:
    """The per-query arrays beside a record (cached per file version within a process)."""
    npz = Path(cell_path).with_suffix(".npz")
    stat = npz.stat()
    return _outcomes_cached(str(npz), stat.st_mtime_ns, stat.st_size)


def _outcomes_or_none(cell_path) -> Optional[dict[str, np.ndarray]]:
    try:
        return per_query_outcomes(cell_path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _identity_var(record: dict, path: Path, label: str) -> float:
    """Per-identity Rank-1 variance of ``record[label]``; records older than that field get
    it from their per-query outcomes."""
    spread = record.get(label, {}).get("per_identity")
    if isinstance(spread, dict):
        return _number(spread.get("rank1_var"))
    outcomes = _outcomes_or_none(path)
    if outcomes is None or "query_pids" not in outcomes or f"{label}_first_hit" not in outcomes:
        return math.nan
    spread = identity_spread(torch.from_numpy(outcomes[f"{label}_first_hit"].astype(np.int64)),
                             torch.from_numpy(outcomes["query_pids"].astype(np.int64)))
    return _number(spread["rank1_var"])


@lru_cache(maxsize=None)
def _interval_settings(version: str) -> dict:
    """Bootstrap settings (resamples, level, seed) of a protocol version; a version this
    package does not ship gets the current one's."""
    try:
        protocol = load_protocol(version)
    except ReIDBenchError:
        protocol = load_protocol(CURRENT_VERSION)
    return {**protocol.interval, "seed": protocol.seed}


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


def cell_intervals(path: Path, record: dict) -> dict[str, tuple[float, float]]:
    """The 95% interval (lo, hi) of every number of a cell that has one, keyed by its flat
    column (:data:`INTERVAL_SOURCES`): from the record when it stores them (``ci95`` and
    ``per_identity.rank1_var_ci95``), else recomputed from the per-query file with the
    record's protocol settings and seed; (NaN, NaN) where neither can give it (a re-ranked
    number of an old record, mINP of a file without per-query INP)."""
    out: dict[str, tuple[float, float]] = {}
    computed: dict[str, dict] = {}
    settings = dict(_interval_settings(str((record.get("protocol") or {}).get("version"))))
    if isinstance(record.get("seed"), int) and not isinstance(record.get("seed"), bool):
        settings["seed"] = record["seed"]
    for column, (label, metric) in INTERVAL_SOURCES.items():
        block = record.get(label)
        if not isinstance(block, dict):
            out[column] = (math.nan, math.nan)
            continue
        if metric == "rank1_var":
            spread = block.get("per_identity")
            stored = spread.get("rank1_var_ci95") if isinstance(spread, dict) else None
        else:
            stored = (block.get("ci95") or {}).get(metric)
        if stored is None and label in ("clean", "attacked"):
            if label not in computed:
                computed[label] = _intervals_from_outcomes(path, label, settings)
            stored = computed[label].get(metric)
        out[column] = _bounds(stored)
        if metric in ("rank1", "mAP", "mINP") and not math.isnan(out[column][0]):
            _fraction(out[column][0]), _fraction(out[column][1])
    return out


def _intervals_from_outcomes(path: Path, label: str, settings: dict) -> dict:
    outcomes = _outcomes_or_none(path)
    if outcomes is None or "query_pids" not in outcomes or f"{label}_first_hit" not in outcomes:
        return {}
    first_hit, pids = outcomes[f"{label}_first_hit"], outcomes["query_pids"]
    out = metric_intervals(first_hit, pids, outcomes[f"{label}_ap"], outcomes.get(f"{label}_inp"), **settings)
    out["rank1_var"] = rank1_variance_interval(first_hit, pids, **settings)
    return out


def _attack_name(record: dict) -> str:
    attack = record.get("attack")
    if isinstance(attack, dict) and isinstance(attack.get("name"), str):
        return attack["name"]
    return str(record["attack_id"]).rsplit("-eps", 1)[0]


def _row(path: Path, record: dict) -> dict:
    """The flat row of one record; KeyError / TypeError / ValueError when it is malformed."""
    model, dataset = record["model"], record["dataset"]
    if not isinstance(model.get("id"), str) or not isinstance(dataset.get("name"), str):
        raise ValueError("model.id and dataset.name must be strings")
    defense = model.get("defense", {})
    measured = "clean" in record and "attacked" in record
    reported = _reported(record)
    if ("clean" in record) != ("attacked" in record) or not (measured or reported):
        raise ValueError("needs measured 'clean' and 'attacked' numbers, or 'reported' ones")
    clean, attacked = record.get("clean", {}), record.get("attacked", {})
    clean_rr, attacked_rr = record.get("clean_reranked") or {}, record.get("attacked_reranked") or {}
    perturbation = record.get("perturbation") or {}
    flags = record.get("sanity_flags", [])
    if not isinstance(flags, list):
        raise ValueError("sanity_flags must be a list")
    # A query-subset cell is its own dataset on the site: never ranked or combined with full cells.
    subset = dataset.get("query_subset")
    label = dataset["name"] if not subset else (
        f"{dataset['name']} (subset: {int(subset['queries'])} of {int(subset['of'])} queries)")
    row = {
        "dataset": label, "split_hash": str(dataset.get("split_hash", "")),
        "model": model["id"], "backbone": str(model.get("backbone", "")),
        "defense": defense.get("name", "none") if isinstance(defense, dict) else str(defense),
        # a cross-dataset cell (train on A, test on B) is filed under B; this says A
        "train_dataset": str((model.get("train_dataset") if isinstance(model.get("train_dataset"), dict)
                              else dataset).get("name", dataset["name"])),
        "attack": str(record["attack_id"]), "attack_name": _attack_name(record),
        "threat_model": str(record.get("threat_model", "")),
        "clean_rank1": _fraction(clean.get("rank1")), "clean_mAP": _fraction(clean.get("mAP")),
        "rank1": _fraction(attacked.get("rank1")), "rank5": _fraction(attacked.get("rank5")),
        "rank10": _fraction(attacked.get("rank10")), "mAP": _fraction(attacked.get("mAP")),
        "mINP": _fraction(attacked.get("mINP")),
        "rr_clean_rank1": _fraction(clean_rr.get("rank1")), "rr_clean_mAP": _fraction(clean_rr.get("mAP")),
        "rr_rank1": _fraction(attacked_rr.get("rank1")), "rr_mAP": _fraction(attacked_rr.get("mAP")),
        "clean_var": _identity_var(record, path, "clean") if measured else math.nan,
        "var": _identity_var(record, path, "attacked") if measured else math.nan,
        "linf": _number(perturbation.get("linf_max")), "eps": _number(perturbation.get("eps")),
        "perturbed": str(record.get("perturbed", "query")), "flags": ", ".join(str(f) for f in flags),
        "wall_time_s": _number(record.get("wall_time_s")), "standardized": measured, "path": str(path),
        "rr_adaptive": bool(attacked_rr.get("adaptive", False)) if attacked_rr else None,
        "weights_sha256": str(model.get("weights_sha256") or ""),
        "protocol_version": str((record.get("protocol") or {}).get("version") or ""),
        "protocol_fingerprint": str((record.get("protocol") or {}).get("fingerprint") or ""),
    }
    if measured:
        for column, (lo, hi) in cell_intervals(path, record).items():
            row[f"{column}_lo"], row[f"{column}_hi"] = lo, hi
    row.update({key: reported.get(key, math.nan if key in REPORTED_NUMBERS else None)
                for key in COLUMNS if key.startswith("reported_")})
    return row


def load_records(results_root: Path, protocol_version: str = CURRENT_VERSION) -> list[tuple[Path, dict, dict]]:
    """(path, record, flat row) of every usable record of one protocol version; a record the
    site cannot use is skipped with one warning line."""
    out = []
    for path, record in iter_cells(results_root, protocol_version):
        if not isinstance(record.get("protocol"), dict) or record["protocol"].get("version") != protocol_version:
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
    return _cells_frame(rows)


def _cells_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["dataset", "model", "attack"], kind="stable").reset_index(drop=True)


# --- aggregates over cells --------------------------------------------------------------------
def consistent_cells(cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, stale): the largest group of ``cells`` agreeing on the weights' sha256, the split
    hash and the protocol fingerprint, and the rest. When two groups are equally large there
    is no telling which is current: nothing is kept."""
    if cells.empty:
        return cells, cells.iloc[0:0]
    keys = list(zip(*(cells[c].fillna("").astype(str) for c in CONSISTENCY)))
    counts = Counter(keys).most_common()
    if len(counts) == 1:
        return cells, cells.iloc[0:0]
    if counts[0][1] == counts[1][1]:
        return cells.iloc[0:0], cells
    keep = np.array([k == counts[0][0] for k in keys])
    return cells[keep], cells[~keep]


def stale_note(attacks) -> Optional[str]:
    """The flag that lists the cells a worst case left out."""
    if not len(attacks):
        return None
    return "stale cells, left out of the worst case (other weights, split or protocol): " + " ".join(sorted(set(attacks)))


def worst_case(cells: pd.DataFrame, perturbed: str = "query") -> dict:
    """Per query, the worst outcome over the given measured cells of one model that perturb
    the same side (the query by default): robust Rank-1 = share of queries whose first match
    stays on top under every attack, robust mAP = mean over queries of the lowest AP any
    attack reached, and the per-identity Rank-1 variance of that worst case; each with its
    95% interval (``*_ci``, the identity bootstrap of the record's protocol).

    Only consistent cells are combined (:func:`consistent_cells`); ``stale`` lists the attack
    ids left out, and when no group is the largest the worst case is refused (None)."""
    if "standardized" in cells:
        cells = cells[cells["standardized"].astype(bool)]
    cells = cells[cells["perturbed"] == perturbed]
    cells, stale = consistent_cells(cells) if all(c in cells for c in CONSISTENCY) else (cells, cells.iloc[0:0])
    empty = {"rank1": None, "mAP": None, "identity_var": None, "rank1_ci": None, "mAP_ci": None,
             "identity_var_ci": None, "attacks": len(cells), "stale": sorted(set(stale["attack"])) if len(stale) else []}
    if cells.empty:
        return empty
    outcomes = [_outcomes_or_none(p) for p in cells["path"]]
    if any(o is None for o in outcomes):
        return empty  # a cell without per-query outcomes
    n = {len(o["attacked_ap"]) for o in outcomes}
    if len(n) != 1:
        return empty
    valid = outcomes[0]["clean_first_hit"] >= 0
    ap = np.min([o["attacked_ap"] for o in outcomes], axis=0)[valid]
    hit = np.all([o["attacked_first_hit"] == 0 for o in outcomes], axis=0)[valid]
    out = {**empty, "rank1": float(hit.mean()) if hit.size else None,
           "mAP": float(np.nanmean(ap)) if ap.size else None}
    if "query_pids" in outcomes[0]:
        pids = outcomes[0]["query_pids"].astype(np.int64)
        worst_first_hit = np.where(valid, np.max([o["attacked_first_hit"] for o in outcomes], axis=0), -1)
        versions = set(cells["protocol_version"]) if "protocol_version" in cells else set()
        settings = _interval_settings(versions.pop() if len(versions) == 1 else CURRENT_VERSION)
        spread = identity_spread(torch.from_numpy(worst_first_hit.astype(np.int64)), torch.from_numpy(pids), **settings)
        out["identity_var"], out["identity_var_ci"] = spread["rank1_var"], spread["rank1_var_ci95"]
        finite = np.isfinite(ap)
        if hit.size:
            out["rank1_ci"] = IdentityBootstrap(pids[valid], **settings).mean_interval(hit.astype(np.float64))
        if finite.any():
            out["mAP_ci"] = IdentityBootstrap(pids[valid][finite], **settings).mean_interval(ap[finite])
    return out


def cross_cell_flags(cells: pd.DataFrame) -> list[str]:
    """Flags that need several cells of one model: a black-box attack beating every white-box
    one, on Rank-1 or on mAP, smells of gradient masking (Athalye et al. 2018; Croce & Hein
    2020). Only consistent cells are compared."""
    if all(c in cells for c in CONSISTENCY):
        cells = consistent_cells(cells)[0]
    beaten = []
    for metric, label in (("rank1", "Rank-1"), ("mAP", "mAP")):
        white = cells[cells["threat_model"] == "white-box"][metric].dropna()
        black = cells[cells["threat_model"].isin(["transfer", "query-based"])][metric].dropna()
        if len(white) and len(black) and black.min() < white.min() - 0.01:
            beaten.append(label)
    return [f"black-box-beats-white-box ({', '.join(beaten)})"] if beaten else []


def _flags(cells: pd.DataFrame, model_cells: pd.DataFrame, extra: Optional[list] = None) -> str:
    flags = {f.strip() for f in ", ".join(cells["flags"]).split(",") if f.strip()}
    return "; ".join(sorted(flags | set(cross_cell_flags(model_cells)) | {e for e in extra or [] if e}))


def _first(series: pd.Series):
    values = series.dropna()
    return values.iloc[0] if len(values) else math.nan


# --- tables ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    key: str  # header of the CSV / JSON downloads
    label: str  # header in the page
    group: str = ""  # the header above it (consecutive equal groups share one cell)
    kind: str = "text"  # text | model | source | pct (fraction shown in %) | var | eps | float | int
    ci: bool = False  # the rows carry "<key>.lo" / "<key>.hi": shown as ± and downloaded as columns


@dataclass
class Table:
    slug: str
    title: str
    note: str
    columns: list[Column]
    rows: list[dict] = field(default_factory=list)

    def header_groups(self) -> list[tuple[str, int]]:
        groups: list[tuple[str, int]] = []
        for column in self.columns:
            if groups and groups[-1][0] == column.group and column.group:
                groups[-1] = (column.group, groups[-1][1] + 1)
            else:
                groups.append((column.group, 1))
        return groups

    def html_rows(self) -> list[list[dict]]:
        return [[_display(row.get(c.key), c, row) for c in self.columns] for row in self.rows]

    def download_columns(self) -> list[tuple[str, str, Column]]:
        """(key, label, column) of every download column: each table column, and after one
        with an interval its bounds."""
        out = []
        for c in self.columns:
            out.append((c.key, c.label, c))
            if c.ci:
                out += [(f"{c.key}.lo", f"{c.label} 95% lower", c), (f"{c.key}.hi", f"{c.label} 95% upper", c)]
        return out

    def records(self) -> list[dict]:
        keys = [key for key, _, _ in self.download_columns()]
        return [{key: _plain(row.get(key)) for key in keys} for row in self.rows]

    def csv(self) -> str:
        return pd.DataFrame(self.records(), columns=[key for key, _, _ in self.download_columns()]).to_csv(
            index=False, float_format="%.6f", lineterminator="\n")

    def json(self) -> str:
        meta = [{"key": key, "label": label, "group": c.group,
                 "unit": {"pct": "fraction", "var": "percent^2", "eps": "1/255"}.get(c.kind, "")}
                for key, label, c in self.download_columns()]
        return _dumps({"title": self.title, "note": self.note, "columns": meta, "rows": self.records()})


def _set(row: dict, key: str, value, interval=None) -> None:
    """``row[key] = value`` with its interval's bounds beside it (NaN where there is none)."""
    lo, hi = (math.nan, math.nan) if interval is None else interval
    row[key], row[f"{key}.lo"], row[f"{key}.hi"] = value, lo, hi


def _plain(value):
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else round(float(value), 6)
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def _dumps(payload) -> str:
    return json.dumps(payload, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def percent(value) -> str:
    """A metric in [0, 1] as the percent text of every table (one decimal); – when missing."""
    return "–" if _missing(value) else f"{100 * float(value):.1f}"


def with_interval(value, interval=None, scale: float = 100.0) -> str:
    """``61.9 ± 4.1`` (a fraction in percent, and half its interval's width; one decimal);
    the number alone without an interval, – when missing."""
    if _missing(value):
        return "–"
    lo, hi = (None, None) if interval is None else interval
    if _missing(lo) or _missing(hi):
        return f"{scale * float(value):.1f}"
    return f"{scale * float(value):.1f} ± {scale * (float(hi) - float(lo)) / 2:.1f}"


def _missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _display(value, column: Column, row: dict) -> dict:
    """One page cell: its text, its sort key (empty when missing) and, for links, its target."""
    if _missing(value) or value == "":
        return {"text": "–", "sort": "", "numeric": column.kind not in ("text", "model", "source")}
    lo, hi = row.get(f"{column.key}.lo"), row.get(f"{column.key}.hi")
    if column.ci and not (_missing(lo) or _missing(hi)):
        scale = 100 if column.kind == "pct" else 1
        return {"text": f"{scale * value:.1f} ± {scale * (hi - lo) / 2:.1f}", "sort": f"{scale * value:.6g}",
                "numeric": True, "title": f"95% interval {scale * lo:.1f} to {scale * hi:.1f}"}
    if column.kind == "pct":
        return {"text": f"{100 * value:.1f}", "sort": f"{100 * value:.6g}", "numeric": True}
    if column.kind in ("var", "eps", "float"):
        return {"text": f"{value:.3g}" if column.kind == "eps" else f"{value:.1f}", "sort": f"{value:.6g}", "numeric": True}
    if column.kind == "int":
        return {"text": str(int(value)), "sort": str(int(value)), "numeric": True}
    cell = {"text": str(value), "sort": str(value).lower(), "numeric": False}
    if column.kind == "model":
        cell["href"] = f"models/{page_name(value)}.html"
    elif column.kind == "source" and row.get("reported_url"):
        cell["href"] = row["reported_url"]
    return cell


def page_name(name: str) -> str:
    """A file name for a model id (or table name) that no id can abuse: characters outside
    [A-Za-z0-9._-] become ``_``, and a changed or long name gets a hash of the original so
    that two ids never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._-") or "unnamed"
    if safe != name or len(safe) > 100:
        safe = f"{safe[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return safe


def _table_slug(dataset: str, eps255: Optional[float], name: str) -> str:
    eps = "eps-unknown" if eps255 is None else f"eps{eps255:g}"
    return page_name(re.sub(r"[\s,]+", "-", f"{dataset}-{eps}-{name}"))


def eps_text(eps255: Optional[float]) -> str:
    return "ε not recorded" if eps255 is None else f"ε = {eps255:g}/255"


def _eps255(eps: float) -> Optional[float]:
    return None if _missing(eps) else round(eps * 255, 3)


def _threat_key(threat_model: str, perturbed: str) -> str:
    return threat_model if perturbed == "query" else f"{threat_model}, {perturbed} perturbed"


def _threat_order(key: str) -> tuple:
    base = key.split(",")[0]
    return ("," in key, THREAT_ORDER.get(base, len(THREAT_ORDER)), key)


def _by_worst_map(rows: list[dict], key: str) -> list[dict]:
    """Most robust first (RobustBench's order), then by model id; missing numbers last."""
    def order(row: dict) -> tuple:
        value = row.get(key)
        return (1, 0.0, row["model"]) if _missing(value) else (0, -float(value), row["model"])

    return sorted(rows, key=order)


MODEL_COLUMNS = [Column("model", "model", kind="model"), Column("backbone", "backbone"), Column("defense", "defense"),
                 Column("train_dataset", "trained on")]
CLEAN_COLUMNS = [Column("clean.rank1", "R-1", "clean", "pct", ci=True), Column("clean.mAP", "mAP", "clean", "pct", ci=True)]
INTERVAL_NOTE = ("a ± b: the number and half the width of its 95% interval (a bootstrap over test identities; the bounds "
                 "are in the tooltip and the downloads).")
VAR_GROUP = "per-identity R-1 variance (%²)"


def _reported_columns(robust_label: str) -> list[Column]:
    return [Column("reported.clean.rank1", "clean R-1", "reported", "pct"),
            Column("reported.clean.mAP", "clean mAP", "reported", "pct"),
            Column("reported.robust.rank1", f"{robust_label} R-1", "reported", "pct"),
            Column("reported.robust.mAP", f"{robust_label} mAP", "reported", "pct"),
            Column("reported.source", "source", "reported", "source"),
            Column("reported.footnote", "note", "reported")]


def _reported_values(cells: pd.DataFrame) -> dict:
    """The submitter's numbers over some cells: clean as claimed, robust = the lowest claim."""
    claimed = cells[cells["reported_source"].notna()]
    if claimed.empty:
        return {}
    sources = sorted(set(claimed["reported_source"]))
    notes = sorted({n for n in claimed["reported_footnote"] if not _missing(n)})
    urls = sorted({u for u in claimed["reported_url"] if not _missing(u)})
    return {"reported.clean.rank1": _first(claimed["reported_clean_rank1"]),
            "reported.clean.mAP": _first(claimed["reported_clean_mAP"]),
            "reported.robust.rank1": claimed["reported_rank1"].min(skipna=True),
            "reported.robust.mAP": claimed["reported_mAP"].min(skipna=True),
            "reported.source": "; ".join(sources), "reported.footnote": "; ".join(notes) or None,
            "reported_url": urls[0] if len(urls) == 1 else None}


def _interval(cell, column: str) -> tuple[float, float]:
    """(lo, hi) of a flat column of one cell (a row of the cells frame)."""
    return getattr(cell, f"{column}_lo"), getattr(cell, f"{column}_hi")


def _model_base(model: str, cells: pd.DataFrame) -> dict:
    first = cells.iloc[0]
    measured = cells[cells["standardized"].astype(bool)]
    # Clean numbers from the cells a worst case would use (any measured cell when none would).
    kept = consistent_cells(measured)[0]
    source = next((c for c in (kept if len(kept) else measured).itertuples()), None)
    row = {"model": model, "backbone": first.backbone, "defense": first.defense, "train_dataset": first.train_dataset}
    for key, column in (("clean.rank1", "clean_rank1"), ("clean.mAP", "clean_mAP"), ("var.clean", "clean_var")):
        if source is None:
            _set(row, key, math.nan)
        else:
            _set(row, key, getattr(source, column), _interval(source, column))
    return row


def expected_attacks(protocol_version: str, dataset: str, eps255) -> Optional[set[str]]:
    """The attacks the protocol's suite runs on ``dataset`` at ``eps255`` (its grid at the
    primary ε, its secondary attacks at the secondary ε, less the cells it does not define
    there); None for a protocol this package does not know."""
    from .runner import undefined_cell

    try:
        protocol = load_protocol(protocol_version)
    except ReIDBenchError:
        return None
    names = protocol.secondary_attacks if eps255 is not None and eps255 == _eps255(protocol.eps_secondary) \
        else protocol.attacks()
    return {name for name in names if not undefined_cell(protocol, name, dataset)}


def _by_worst_rank1(rows: list[dict]) -> list[dict]:
    """RobustBench's order: models with every expected cell first, by worst-case Rank-1 (most
    robust first), ranked; then the incomplete ones, unranked, by the same number. A worst case
    over fewer attacks is not comparable with one over the whole grid."""
    def order(row: dict) -> tuple:
        value = row.get("standardized.rank1")
        return (not row["complete"], _missing(value), 0.0 if _missing(value) else -float(value), row["model"])

    ordered = sorted(rows, key=order)
    for position, row in enumerate(ordered, 1):
        row["rank"] = position if row["complete"] and not _missing(row.get("standardized.rank1")) else None
    return ordered


def summary_table(dataset: str, eps255, cells: pd.DataFrame, grid: Optional[set[str]],
                  sweep: Optional[dict] = None, expected: Optional[set[str]] = None) -> Table:
    """The headline of one dataset at one ε: reported, standardized and adaptive numbers.
    ``sweep``: the budget sweep's findings per model (``results.read_budget_sweep``); a model
    whose Rank-1 kept falling with more iterations is flagged ``budget-sensitive``.
    ``expected``: the attacks every model should have here (:func:`expected_attacks`); a model
    that lacks some is marked incomplete and never ranked among the complete ones."""
    rows, any_reported, any_adaptive = [], False, False
    for model, mcells in cells.groupby("model", sort=True):
        in_grid = mcells["attack_name"].isin(grid) if grid is not None else pd.Series(True, index=mcells.index)
        standard = worst_case(mcells[in_grid])
        row = {**_model_base(model, mcells), **_reported_values(mcells), "standardized.attacks": standard["attacks"]}
        have = set(mcells.loc[mcells["standardized"].astype(bool) & (mcells["perturbed"] == "query"), "attack_name"])
        missing = sorted((expected or set()) - have)
        row["complete"] = not missing
        incomplete = f"incomplete ({len(expected) - len(missing)} of {len(expected)} attacks)" if missing else None
        _set(row, "standardized.rank1", standard["rank1"], standard["rank1_ci"])
        _set(row, "standardized.mAP", standard["mAP"], standard["mAP_ci"])
        _set(row, "var.worst", standard["identity_var"], standard["identity_var_ci"])
        stale = list(standard["stale"])
        beyond = mcells[~in_grid & mcells["standardized"].astype(bool) & (mcells["perturbed"] == "query")]
        if not beyond.empty:
            adaptive = worst_case(mcells)
            _set(row, "adaptive.rank1", adaptive["rank1"], adaptive["rank1_ci"])
            _set(row, "adaptive.mAP", adaptive["mAP"], adaptive["mAP_ci"])
            row["adaptive.attacks"] = adaptive["attacks"]
            stale += adaptive["stale"]
            any_adaptive = True
        sensitive = BUDGET_FLAG if (sweep or {}).get(model, {}).get("flag") else None
        row["flags"] = _flags(mcells, mcells[mcells["standardized"].astype(bool)], [incomplete, stale_note(stale), sensitive])
        any_reported |= "reported.source" in row
        rows.append(row)
    columns = [Column("rank", "#", kind="int")] + MODEL_COLUMNS
    if any_reported:
        columns += _reported_columns("robust")
    columns += [Column("clean.rank1", "clean R-1", "standardized", "pct", ci=True),
                Column("clean.mAP", "clean mAP", "standardized", "pct", ci=True),
                Column("standardized.rank1", "worst R-1", "standardized", "pct", ci=True),
                Column("standardized.mAP", "worst mAP", "standardized", "pct", ci=True),
                Column("standardized.attacks", "attacks", "standardized", "int")]
    if any_adaptive:
        columns += [Column("adaptive.rank1", "worst R-1", "adaptive", "pct", ci=True),
                    Column("adaptive.mAP", "worst mAP", "adaptive", "pct", ci=True),
                    Column("adaptive.attacks", "attacks", "adaptive", "int")]
    columns += [Column("var.clean", "clean", VAR_GROUP, "var", ci=True), Column("var.worst", "worst", VAR_GROUP, "var", ci=True),
                Column("flags", "sanity flags")]
    note = ("Sorted by worst-case Rank-1; # ranks the models that have every cell the protocol runs here, the others "
            "follow unranked, flagged incomplete. "
            "Standardized: measured by the protocol runner; worst = per query, the worst outcome over every attack of the "
            "protocol grid that perturbs the query. Adaptive: the same over every attack run on the model (grid and "
            "variants), where variants were run. A worst case combines only cells with the same weights, split and "
            "protocol; stale cells are named in the flags. Reported: the submitter's claim (robust = the lowest "
            "claimed). Per-identity variance: clean, and under the standardized worst case. Re-ranked numbers are not "
            "here: under attack they are non-adaptive (see the model pages). " + INTERVAL_NOTE)
    return Table(_table_slug(dataset, eps255, "summary"), f"{dataset}, {eps_text(eps255)}: summary", note, columns,
                 _by_worst_rank1(rows))


def threat_table(dataset: str, eps255, threat: str, cells: pd.DataFrame, all_cells: pd.DataFrame) -> Table:
    """One dataset × ε × threat model (cells that perturb one side): each attack's numbers
    and their per-query worst case."""
    perturbed = cells["perturbed"].iloc[0]
    attacks = sorted(cells["attack"].unique())
    rows = []
    for model, mcells in cells.groupby("model", sort=True):
        by_attack = {r.attack: r for r in mcells[mcells["standardized"].astype(bool)].itertuples()}
        worst = worst_case(mcells, perturbed)
        row = {**_model_base(model, all_cells[all_cells["model"] == model]), **_reported_values(mcells),
               "flags": _flags(mcells, all_cells[(all_cells["model"] == model) & all_cells["standardized"].astype(bool)],
                               [stale_note(worst["stale"])])}
        _set(row, "worst.rank1", worst["rank1"], worst["rank1_ci"])
        _set(row, "worst.mAP", worst["mAP"], worst["mAP_ci"])
        _set(row, "var.worst", worst["identity_var"], worst["identity_var_ci"])
        for attack in attacks:
            if attack in by_attack:
                cell = by_attack[attack]
                _set(row, f"{attack}.rank1", cell.rank1, _interval(cell, "rank1"))
                _set(row, f"{attack}.mAP", cell.mAP, _interval(cell, "mAP"))
        rows.append(row)
    columns = MODEL_COLUMNS + CLEAN_COLUMNS
    for attack in attacks:
        columns += [Column(f"{attack}.rank1", "R-1", attack, "pct", ci=True), Column(f"{attack}.mAP", "mAP", attack, "pct", ci=True)]
    columns += [Column("worst.rank1", "R-1", "worst case", "pct", ci=True), Column("worst.mAP", "mAP", "worst case", "pct", ci=True),
                Column("var.clean", "clean", VAR_GROUP, "var", ci=True), Column("var.worst", "worst", VAR_GROUP, "var", ci=True)]
    if any("reported.source" in r for r in rows):
        columns += _reported_columns("lowest")
    columns.append(Column("flags", "sanity flags"))
    note = ("Rank-1 / mAP in %, standardized (measured by the protocol runner). Worst case: per query, over the "
            "attacks of this table whose cells share the weights, split and protocol (stale cells are named in the "
            "flags). Per-identity variance: clean, and under that worst case. " + INTERVAL_NOTE)
    return Table(_table_slug(dataset, eps255, threat), f"{dataset}, {eps_text(eps255)}: {threat}", note, columns,
                 _by_worst_map(rows, "worst.mAP"))


def index_sections(cells: pd.DataFrame, grid: Optional[set[str]] = None, sweep: Optional[dict] = None,
                   protocol_version: Optional[str] = None) -> list[dict]:
    """Per dataset and ε: the clean-against-worst picture, the summary table, then one table
    per threat model present."""
    sections = []
    if cells.empty:
        return sections
    cells = cells.assign(eps255=[_eps255(e) for e in cells["eps"]],
                         threat=[_threat_key(t, p) for t, p in zip(cells["threat_model"], cells["perturbed"])])
    for dataset, dcells in cells.groupby("dataset", sort=True):
        for eps255 in sorted(set(dcells["eps255"]), key=lambda e: (e is None, e or 0)):
            ecells = dcells[dcells["eps255"].isna()] if eps255 is None else dcells[dcells["eps255"] == eps255]
            expected = expected_attacks(protocol_version, dataset, eps255) if protocol_version else None
            summary = summary_table(dataset, eps255, ecells, grid, sweep, expected)
            tables = [summary]
            for threat in sorted(ecells["threat"].unique(), key=_threat_order):
                tables.append(threat_table(dataset, eps255, threat, ecells[ecells["threat"] == threat], ecells))
            sections.append({"dataset": dataset, "eps": eps_text(eps255), "tables": tables,
                             "picture": robustness_map(summary.rows, f"{dataset}, {eps_text(eps255)}"),
                             "split_hashes": sorted(h for h in ecells["split_hash"].unique() if h)})
    return sections


# --- model pages ----------------------------------------------------------------------------
RERANKED_ATTACKED = "attacked, re-ranked: non-adaptive"
MODEL_TABLE_COLUMNS = [
    Column("dataset", "dataset"), Column("attack", "attack"), Column("threat_model", "threat model"),
    Column("eps255", "ε (/255)", kind="eps"), Column("perturbed", "perturbed"),
    Column("clean.rank1", "R-1", "clean", "pct", ci=True), Column("clean.mAP", "mAP", "clean", "pct", ci=True),
    Column("attacked.rank1", "R-1", "attacked", "pct", ci=True), Column("attacked.rank5", "R-5", "attacked", "pct"),
    Column("attacked.rank10", "R-10", "attacked", "pct"), Column("attacked.mAP", "mAP", "attacked", "pct", ci=True),
    Column("attacked.mINP", "mINP", "attacked", "pct", ci=True),
    Column("clean_reranked.rank1", "R-1", "clean, re-ranked", "pct", ci=True),
    Column("clean_reranked.mAP", "mAP", "clean, re-ranked", "pct", ci=True),
    Column("attacked_reranked.rank1", "R-1", RERANKED_ATTACKED, "pct", ci=True),
    Column("attacked_reranked.mAP", "mAP", RERANKED_ATTACKED, "pct", ci=True),
    Column("var.attacked", "attacked", VAR_GROUP, "var", ci=True),
    Column("linf255", "L∞ used (/255)", kind="float"), Column("wall_time_s", "wall time (s)", kind="float"),
    Column("flags", "sanity flags"),
]
_MODEL_TABLE_SOURCE = {"clean.rank1": "clean_rank1", "clean.mAP": "clean_mAP", "attacked.rank1": "rank1",
                       "attacked.rank5": "rank5", "attacked.rank10": "rank10", "attacked.mAP": "mAP", "attacked.mINP": "mINP",
                       "clean_reranked.rank1": "rr_clean_rank1", "clean_reranked.mAP": "rr_clean_mAP",
                       "attacked_reranked.rank1": "rr_rank1", "attacked_reranked.mAP": "rr_mAP", "var.attacked": "var"}


def model_table(model: str, cells: pd.DataFrame) -> Table:
    rows = []
    order = sorted(cells.index, key=lambda i: (cells.at[i, "dataset"], _threat_order(
        _threat_key(cells.at[i, "threat_model"], cells.at[i, "perturbed"])), cells.at[i, "attack"]))
    stale = set()
    for _, dcells in cells[cells["standardized"].astype(bool)].groupby("dataset"):
        stale |= set(consistent_cells(dcells)[1].index)
    for i in order:
        r = cells.loc[i]
        flags = [f for f in (r["flags"], "stale: other weights, split or protocol than the model's other cells"
                             if i in stale else "") if f]
        row = {"dataset": r["dataset"], "attack": r["attack"], "threat_model": r["threat_model"], "eps255": _eps255(r["eps"]),
               "perturbed": r["perturbed"], "linf255": None if _missing(r["linf"]) else r["linf"] * 255,
               "wall_time_s": r["wall_time_s"], "flags": "; ".join(flags), **_reported_values(cells.loc[[i]])}
        for key, source in _MODEL_TABLE_SOURCE.items():
            if source in INTERVAL_SOURCES:
                _set(row, key, r[source], (r[f"{source}_lo"], r[f"{source}_hi"]))
            else:
                row[key] = r[source]
        rows.append(row)
    columns = list(MODEL_TABLE_COLUMNS)
    if cells["reported_source"].notna().any():
        columns[-1:-1] = _reported_columns("attacked")
    return Table(page_name(model), f"{model}: every cell", "Rank-1 / mAP / mINP in %, plain and with k-reciprocal "
                 "re-ranking; per-identity variance of the attacked Rank-1. Re-ranked numbers under attack are "
                 "non-adaptive: the attacks optimise plain distances, not re-ranked ones, so these overstate robustness "
                 "and never enter a worst case. " + INTERVAL_NOTE, columns, rows)


def robustness_svg(series: dict[str, list[tuple[float, float]]], clean: Optional[float], metric: str) -> Markup:
    """An inline SVG of ``metric`` (fractions) against ε (in /255), one series per attack:
    markers at the measured ε, joined by lines where an attack was run at several ε; the
    clean value as a dashed line at the top."""
    names = sorted(series)
    width, plot_w, height = 640, 330, max(240, 40 + 15 * len(names))
    left, top, plot_h = 46, 14, 190
    max_eps = max([e for points in series.values() for e, _ in points] + [1.0])
    x = lambda e: left + plot_w * e / (max_eps * 1.08)  # noqa: E731
    y = lambda v: top + plot_h * (1 - v)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(metric)} against epsilon">']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" class="tick" text-anchor="end">{100 * tick:.0f}</text>')
    for tick in sorted({0.0} | {e for points in series.values() for e, _ in points}):
        parts.append(f'<text x="{x(tick):.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" class="axis"/>'
                 f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="axis"/>'
                 f'<text x="{left + plot_w / 2}" y="{top + plot_h + 34}" class="label" text-anchor="middle">ε (/255)</text>'
                 f'<text x="12" y="{top + plot_h / 2}" class="label" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + plot_h / 2})">{escape(metric)} (%)</text>')
    if clean is not None and not _missing(clean):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(clean):.1f}" y2="{y(clean):.1f}" class="clean">'
                     f'<title>clean {escape(metric)} {100 * clean:.1f}</title></line>')
    for i, name in enumerate(names):
        colour, dash = PALETTE[i % len(PALETTE)], ' stroke-dasharray="5 3"' if i >= len(PALETTE) else ""
        points = sorted(series[name])
        if len(points) > 1:
            coords = " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in points)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for e, v in points:
            parts.append(f'<circle cx="{x(e):.1f}" cy="{y(v):.1f}" r="4" fill="{colour}">'
                         f'<title>{escape(name)}, ε = {e:g}/255: {escape(metric)} {100 * v:.1f}</title></circle>')
        ly = top + 6 + 15 * i
        parts.append(f'<line x1="{left + plot_w + 16}" x2="{left + plot_w + 36}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                     f'stroke-width="3"{dash}/><text x="{left + plot_w + 42}" y="{ly + 4}" class="legend">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


#: defense name -> family, the colour of its point on the index's picture (anything else: "other")
DEFENSE_FAMILIES = {"none": "undefended", "at": "adversarial training", "goat": "adversarial training",
                    "goat-ce": "adversarial training", "goat-sma": "adversarial training",
                    "goat-fna": "adversarial training", "sadstrm": "adversarial training",
                    "cs": "input transform", "rrp": "input transform", "jpeg": "input transform",
                    "jad": "input transform + training", "jad-proactive": "input transform + training",
                    "apd": "generative", "ddid": "generative"}
FAMILY_COLOURS = {"undefended": "#555555", "adversarial training": "#4e79a7", "input transform": "#f28e2b",
                  "input transform + training": "#e15759", "generative": "#59a14f", "other": "#b07aa1"}


def defense_family(defense) -> str:
    """The family of a defense as the cells frame holds it (a name or a JSON description)."""
    name = defense
    if isinstance(defense, str) and defense.startswith("{"):
        try:
            name = json.loads(defense).get("name")
        except (ValueError, AttributeError):
            name = None
    elif isinstance(defense, dict):
        name = defense.get("name")
    return DEFENSE_FAMILIES.get(name, "other")


def robustness_map(rows: list[dict], title: str) -> Optional[Markup]:
    """An inline SVG of clean Rank-1 (x) against worst-case Rank-1 (y), one point per model
    with its 95% intervals as bars, coloured by defense family and linked to the model's page;
    the diagonal is 'no robustness lost'. None when no model has both numbers."""
    points = [r for r in rows if not _missing(r.get("clean.rank1")) and not _missing(r.get("standardized.rank1"))]
    if not points:
        return None
    width, height, left, top, size = 660, 380, 52, 16, 320
    x = lambda v: left + size * v  # noqa: E731
    y = lambda v: top + size * (1 - v)  # noqa: E731
    parts = [f'<svg class="plot map" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}: clean against worst-case Rank-1">']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + size}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" class="grid"/>'
                     f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top}" y2="{top + size}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" class="tick" text-anchor="end">{100 * tick:.0f}</text>'
                     f'<text x="{x(tick):.1f}" y="{top + size + 16}" class="tick" text-anchor="middle">{100 * tick:.0f}</text>')
    parts.append(f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" class="clean"/>'
                 f'<text x="{left + size / 2}" y="{top + size + 34}" class="label" text-anchor="middle">clean Rank-1 (%)</text>'
                 f'<text x="14" y="{top + size / 2}" class="label" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + size / 2})">worst-case Rank-1 (%)</text>')
    families = []
    for row in points:
        family = defense_family(row.get("defense"))
        families.append(family)
        colour = FAMILY_COLOURS.get(family, FAMILY_COLOURS["other"])
        cx, cy = float(row["clean.rank1"]), float(row["standardized.rank1"])
        bars = []
        for key, horizontal in (("clean.rank1", True), ("standardized.rank1", False)):
            lo, hi = row.get(f"{key}.lo"), row.get(f"{key}.hi")
            if not _missing(lo) and not _missing(hi):
                bars.append(f'<line x1="{x(lo):.1f}" x2="{x(hi):.1f}" y1="{y(cy):.1f}" y2="{y(cy):.1f}" stroke="{colour}"/>'
                            if horizontal else
                            f'<line x1="{x(cx):.1f}" x2="{x(cx):.1f}" y1="{y(lo):.1f}" y2="{y(hi):.1f}" stroke="{colour}"/>')
        shape = "" if row.get("complete", True) else ' fill-opacity="0.35"'
        label = (f'{row["model"]} ({family}{"" if row.get("complete", True) else ", incomplete"}): clean Rank-1 '
                 f'{100 * cx:.1f}, worst-case Rank-1 {100 * cy:.1f}')
        parts.append(f'<a href="models/{page_name(row["model"])}.html"><g>{"".join(bars)}'
                     f'<circle cx="{x(cx):.1f}" cy="{y(cy):.1f}" r="5" fill="{colour}"{shape}>'
                     f'<title>{escape(label)}</title></circle></g></a>')
    for i, family in enumerate(f for f in FAMILY_COLOURS if f in families):
        ly = top + 8 + 16 * i
        parts.append(f'<circle cx="{left + size + 24}" cy="{ly}" r="5" fill="{FAMILY_COLOURS[family]}"/>'
                     f'<text x="{left + size + 34}" y="{ly + 4}" class="legend">{escape(family)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _thumbnail(value) -> Optional[str]:
    return value if isinstance(value, str) and _BASE64.match(value) else None


def example_figure(record: dict) -> Optional[dict]:
    """The example query of a record as rows of tiles (thumbnail or index, match flag), or
    None when the record has no usable example block."""
    example = record.get("example")
    if not isinstance(example, dict):
        return None
    try:
        thumbs = example.get("thumbnails") or {}
        gallery = thumbs.get("gallery") or {}
        rows = []
        for label, query_key in (("clean", "query"), ("attacked", "query_attacked")):
            ranking = example[label]
            tiles = [{"rank": rank + 1, "index": int(g), "match": bool(m), "png": _thumbnail(gallery.get(str(int(g))))}
                     for rank, (g, m) in enumerate(zip(ranking["gallery_index"], ranking["match"]))]
            rows.append({"label": label, "query": _thumbnail(thumbs.get(query_key)) or _thumbnail(thumbs.get("query")),
                         "tiles": tiles})
        return {"query_index": int(example["query_index"]), "query_pid": int(example["query_pid"]),
                "attack": record.get("attack_id"), "eps": (record.get("perturbation") or {}).get("eps"),
                "perturbed": record.get("perturbed", "query"), "rows": rows}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _distinct(values: list) -> str:
    counts: dict[str, int] = {}
    for value in values:
        text = "–" if value is None else value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        counts[text] = counts.get(text, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{text} ({n} cells)" for text, n in sorted(counts.items()))


def provenance(records: list[dict]) -> list[tuple[str, str]]:
    """What produced a model's numbers; a field that differs between cells lists each value."""
    env = [r.get("environment") or {} for r in records]
    rows = [("weights sha256", _distinct([r["model"].get("weights_sha256") for r in records])),
            ("protocol", _distinct([f"{(r.get('protocol') or {}).get('version')} (fingerprint "
                                    f"{(r.get('protocol') or {}).get('fingerprint')})" for r in records]))]
    packages = sorted({p for e in env for p in (e.get("versions") or {})})
    rows += [(f"{p} version", _distinct([(e.get("versions") or {}).get(p) for e in env])) for p in packages]
    rows += [("device", _distinct([r.get("device") for r in records])), ("GPU", _distinct([e.get("cuda") for e in env])),
             ("CPU cores", _distinct([e.get("cpu_count") for e in env])), ("python", _distinct([e.get("python") for e in env])),
             ("platform", _distinct([e.get("platform") for e in env])),
             ("git commit", _distinct([e.get("git_commit") for e in env])),
             ("seed", _distinct([r.get("seed") for r in records]))]
    return rows


def model_page(model: str, cells: pd.DataFrame, entries: list[tuple[Path, dict]]) -> dict:
    """What a model's page shows, from its cells (rows of the flat table) and (path, record) pairs."""
    by_path = {str(path): record for path, record in entries}
    records = [record for _, record in entries]
    datasets = []
    for dataset, dcells in cells.groupby("dataset", sort=True):
        measured = dcells[dcells["standardized"].astype(bool)]
        plots = []
        for metric, key, clean_key in (("mAP", "mAP", "clean_mAP"), ("Rank-1", "rank1", "clean_rank1")):
            series: dict[str, list[tuple[float, float]]] = {}
            for r in measured.itertuples():
                if not _missing(r.eps) and not _missing(getattr(r, key)):
                    label = r.attack_name if r.perturbed == "query" else f"{r.attack_name} ({r.perturbed})"
                    series.setdefault(label, []).append((round(r.eps * 255, 3), float(getattr(r, key))))
            # A curve against ε needs two budgets; with one, the table says it all.
            if len({e for points in series.values() for e, _ in points}) >= 2:
                plots.append(robustness_svg(series, _first(measured[clean_key]), metric))
        candidates = [r for r in measured.sort_values(["eps", "mAP", "attack"], kind="stable").itertuples()
                      if r.perturbed == "query" and example_figure(by_path[r.path]) is not None]
        primary = [r for r in candidates if r.eps == candidates[0].eps] if candidates else []
        datasets.append({"name": dataset, "plots": plots,
                         "example": example_figure(by_path[primary[0].path]) if primary else None})
    first = records[0]["model"]
    return {
        "id": model, "backbone": first.get("backbone", ""),
        "defense": json.dumps(first.get("defense", "none"), sort_keys=True),
        "train_dataset": _distinct([r["model"].get("train_dataset") for r in records]),
        "recipe": _distinct([r["model"].get("recipe") for r in records]),
        "architecture": _distinct([r["model"].get("model") for r in records]),
        "provenance": provenance(records), "datasets": datasets, "table": model_table(model, cells),
    }


# --- rendering ----------------------------------------------------------------------------------
def _grid(protocol_version: str) -> Optional[set[str]]:
    """The protocol's attack grid (None for a version this package does not know: every
    attack then counts as standardized)."""
    try:
        return set(load_protocol(protocol_version).attacks())
    except ReIDBenchError:
        return None


def _write(path: Path, text: str) -> None:
    from .cache import atomic_write

    atomic_write(path, text.encode("utf-8"), check=False, fsync=False)


def _prune(folder: Path, keep: set[Path]) -> None:
    """Remove pages and downloads of an earlier render that this one did not write."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.suffix in (".html", ".csv", ".json") and path not in keep:
                path.unlink()


def result_versions(results_root: Path) -> list[str]:
    """The protocol versions that have a folder in the result store, oldest first."""
    root = Path(results_root)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name)]
    return sorted(names, key=lambda v: int(v[1:]))


def protocol_summary(protocol_version: str) -> str:
    """What the numbers of a version mean beyond the shared conventions, for its pages."""
    if protocol_version not in known_versions():
        return (f"This package does not ship protocol {protocol_version}: its attack grid and settings are unknown "
                "here, so every attack counts as standardized.")
    p = load_protocol(protocol_version)
    parts = ["a positive tied with a negative ranks after it" if p.ties == "pessimistic"
             else "a positive tied with a negative is ordered by gallery index"]
    parts.append(f"iterative attacks run from {p.restarts} starts and keep each query's best iterate" if p.restarts > 1
                 else "iterative attacks run once")
    return "Ties: " + parts[0] + "; " + parts[1] + "."


def render_site(results_root: Path, out_dir: Path | None = None, protocol_version: str = CURRENT_VERSION) -> Path:
    """Render the site (see the module docstring) into ``out_dir``; returns the index path.

    ``protocol_version``'s cells are the site; every other version in the result folder is
    rendered apart, into ``out_dir/protocol-<version>/``, and linked with a note."""
    out_dir = Path(out_dir) if out_dir else DEFAULT_SITE
    others = [v for v in result_versions(results_root) if v != protocol_version]
    index = _render_version(results_root, out_dir, protocol_version,
                            {"others": [(v, f"protocol-{v}/index.html") for v in others], "current": None})
    for version in others:
        _render_version(results_root, out_dir / f"protocol-{version}", version,
                        {"others": [], "current": (protocol_version, "../index.html")})
    for path in out_dir.glob("protocol-v*"):
        if path.is_dir() and path.name[len("protocol-"):] not in others:
            shutil.rmtree(path)
    return index


def _render_version(results_root: Path, out_dir: Path, protocol_version: str, apart: dict) -> Path:
    """The site of one protocol version; ``apart`` names the other versions' sites (``others``)
    or, for a version rendered apart, the main one (``current``)."""
    loaded = load_records(results_root, protocol_version)
    cells = _cells_frame([row for _, _, row in loaded])
    env = Environment(loader=FileSystemLoader(LEADERBOARD_DIR / "templates"), autoescape=select_autoescape(["html", "j2"]),
                      keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    sections = index_sections(cells, _grid(protocol_version), read_budget_sweep(results_root, protocol_version),
                              protocol_version)
    files: dict[Path, str] = {}
    for section in sections:
        for table in section["tables"]:
            files[out_dir / "tables" / f"{table.slug}.csv"] = table.csv()
            files[out_dir / "tables" / f"{table.slug}.json"] = table.json()
    records_by_model: dict[str, list[tuple[Path, dict]]] = {}
    for path, record, row in loaded:
        records_by_model.setdefault(row["model"], []).append((path, record))
    page_template = env.get_template("model.html.j2")
    for model in sorted(records_by_model):
        page = model_page(model, cells[cells["model"] == model], records_by_model[model])
        name = page_name(model)
        files[out_dir / "models" / f"{name}.html"] = page_template.render(root="../", protocol_version=protocol_version, model=page)
        files[out_dir / "models" / f"{name}.csv"] = page["table"].csv()
        files[out_dir / "models" / f"{name}.json"] = page["table"].json()
    index = out_dir / "index.html"
    files[index] = env.get_template("index.html.j2").render(
        root="", protocol_version=protocol_version, sections=sections, num_cells=len(cells),
        num_models=len(records_by_model), protocol_note=protocol_summary(protocol_version), **apart)
    flat = cells.drop(columns=["path"])
    files[out_dir / "cells.csv"] = flat.to_csv(index=False, float_format="%.6f", lineterminator="\n")
    files[out_dir / "cells.json"] = _dumps([{k: _plain(v) for k, v in row.items()} for row in flat.to_dict("records")])
    for path, text in sorted(files.items()):
        _write(path, text)
    for folder in ("models", "tables"):
        _prune(out_dir / folder, set(files))
    (out_dir / "assets").mkdir(parents=True, exist_ok=True)
    for asset in sorted((LEADERBOARD_DIR / "static").iterdir()):
        shutil.copyfile(asset, out_dir / "assets" / asset.name)
    return index
