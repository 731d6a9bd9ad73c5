"""The leaderboard: a pure function from a folder of result records to a static HTML site.

Same records in, same bytes out: rows and columns are sorted, nothing depends on the time
or the machine that renders. Templates live in ``leaderboard/templates``; jinja2
autoescaping is on, so a model name holding HTML renders as text.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from .protocol import CURRENT_VERSION
from .results import iter_cells

LEADERBOARD_DIR = Path(__file__).resolve().parent.parent / "leaderboard"


def results_table(results_root: Path, protocol_version: str = CURRENT_VERSION) -> pd.DataFrame:
    """One row per cell (model × dataset × attack), flat columns."""
    rows = []
    for _, record in iter_cells(results_root, protocol_version):
        if record.get("protocol", {}).get("version") != protocol_version:
            continue  # never mix protocol versions in one table
        model, dataset = record["model"], record["dataset"]
        defense = model.get("defense", {})
        rows.append({
            "dataset": dataset["name"], "split_hash": dataset.get("split_hash", ""),
            "model": model["id"], "backbone": model.get("backbone", ""),
            "defense": defense.get("name", "none") if isinstance(defense, dict) else str(defense),
            "attack": record["attack_id"], "threat_model": record.get("threat_model", ""),
            "clean_rank1": record["clean"]["rank1"], "clean_mAP": record["clean"]["mAP"],
            "rank1": record["attacked"]["rank1"], "mAP": record["attacked"]["mAP"],
            "mINP": record["attacked"].get("mINP"),
            "rr_rank1": record.get("attacked_reranked", {}).get("rank1"),
            "rr_mAP": record.get("attacked_reranked", {}).get("mAP"),
            "linf": record.get("perturbation", {}).get("linf_max"),
            "flags": ", ".join(record.get("sanity_flags", [])),
        })
    columns = ["dataset", "split_hash", "model", "backbone", "defense", "attack", "threat_model", "clean_rank1",
               "clean_mAP", "rank1", "mAP", "mINP", "rr_rank1", "rr_mAP", "linf", "flags"]
    return pd.DataFrame(rows, columns=columns).sort_values(["dataset", "model", "attack"], kind="stable").reset_index(drop=True)


def _pct(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{100 * float(value):.1f}"


def dataset_tables(cells: pd.DataFrame) -> list[dict]:
    """Per dataset: one row per model with clean numbers and each attack's Rank-1 / mAP."""
    tables = []
    for dataset, group in cells.groupby("dataset", sort=True):
        attacks = sorted(group["attack"].unique())
        rows = []
        for model, mrows in group.groupby("model", sort=True):
            first = mrows.iloc[0]
            by_attack = {r.attack: r for r in mrows.itertuples()}
            rows.append({
                "model": model, "backbone": first.backbone, "defense": first.defense,
                "clean": (_pct(first.clean_rank1), _pct(first.clean_mAP)),
                "attacks": [(_pct(by_attack[a].rank1), _pct(by_attack[a].mAP)) if a in by_attack else ("–", "–")
                            for a in attacks],
                "flags": "; ".join(sorted({f for f in mrows["flags"] if f})),
            })
        tables.append({"dataset": dataset, "split_hashes": sorted(group["split_hash"].unique()), "attacks": attacks, "rows": rows})
    return tables


def render_site(results_root: Path, out_dir: Path | None = None, protocol_version: str = CURRENT_VERSION) -> Path:
    """Render ``index.html`` (and the CSV of every cell) into ``out_dir``; returns the index path."""
    out_dir = Path(out_dir) if out_dir else LEADERBOARD_DIR / "site"
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = results_table(results_root, protocol_version)
    env = Environment(loader=FileSystemLoader(LEADERBOARD_DIR / "templates"), autoescape=select_autoescape(["html", "j2"]),
                      keep_trailing_newline=True)
    html = env.get_template("index.html.j2").render(protocol_version=protocol_version, tables=dataset_tables(cells),
                                                     num_cells=len(cells))
    index = out_dir / "index.html"
    for path, text in ((index, html), (out_dir / "cells.csv", cells.to_csv(index=False, float_format="%.6f"))):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return index
