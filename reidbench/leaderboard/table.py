"""The table model of the site: columns, rows, and how a number is shown and downloaded.

A table is rendered in the page (``_table.html.j2``: ``a ± b`` for a number with an interval,
its bounds in the tooltip) and written beside it as CSV and JSON with the numbers as fractions,
as in the records, each interval as ``<key>.lo`` / ``<key>.hi`` columns.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from .records import is_missing

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
        return [{key: plain_value(row.get(key)) for key in keys} for row in self.rows]

    def csv(self) -> str:
        return pd.DataFrame(self.records(), columns=[key for key, _, _ in self.download_columns()]).to_csv(
            index=False, float_format="%.6f", lineterminator="\n")

    def json(self) -> str:
        meta = [{"key": key, "label": label, "group": c.group,
                 "unit": {"pct": "fraction", "var": "percent^2", "eps": "1/255"}.get(c.kind, "")}
                for key, label, c in self.download_columns()]
        return json_text({"title": self.title, "note": self.note, "columns": meta, "rows": self.records()})


def put_value(row: dict, key: str, value, interval=None) -> None:
    """``row[key] = value`` with its interval's bounds beside it (NaN where there is none)."""
    lo, hi = (math.nan, math.nan) if interval is None else interval
    row[key], row[f"{key}.lo"], row[f"{key}.hi"] = value, lo, hi


def plain_value(value):
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else round(float(value), 6)
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def json_text(payload) -> str:
    return json.dumps(payload, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def percent(value) -> str:
    """A metric in [0, 1] as the percent text of every table (one decimal); – when missing."""
    return "–" if is_missing(value) else f"{100 * float(value):.1f}"


def with_interval(value, interval=None, scale: float = 100.0) -> str:
    """``61.9 ± 4.1`` (a fraction in percent, and half its interval's width; one decimal);
    the number alone without an interval, – when missing."""
    if is_missing(value):
        return "–"
    lo, hi = (None, None) if interval is None else interval
    if is_missing(lo) or is_missing(hi):
        return f"{scale * float(value):.1f}"
    return f"{scale * float(value):.1f} ± {scale * (float(hi) - float(lo)) / 2:.1f}"


def _display(value, column: Column, row: dict) -> dict:
    """One page cell: its text, its sort key (empty when missing) and, for links, its target."""
    if is_missing(value) or value == "":
        return {"text": "–", "sort": "", "numeric": column.kind not in ("text", "model", "source")}
    lo, hi = row.get(f"{column.key}.lo"), row.get(f"{column.key}.hi")
    if column.ci and not (is_missing(lo) or is_missing(hi)):
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


def table_slug(dataset: str, eps255: Optional[float], name: str) -> str:
    eps = "eps-unknown" if eps255 is None else f"eps{eps255:g}"
    return page_name(re.sub(r"[\s,]+", "-", f"{dataset}-{eps}-{name}"))


def eps_text(eps255: Optional[float]) -> str:
    return "ε not recorded" if eps255 is None else f"ε = {eps255:g}/255"
