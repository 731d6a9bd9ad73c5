"""The leaderboard: a pure function from a folder of result records to a static HTML site.

Same records in, same bytes out: rows and columns are sorted, nothing depends on the time
or the machine that renders. Templates live in ``leaderboard/templates``; jinja2
autoescaping is on, so a model name holding HTML renders as text.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from .protocol import CURRENT_VERSION
from .results import iter_cells, read_per_query

LEADERBOARD_DIR = Path(__file__).resolve().parent.parent / "leaderboard"


def results_table(results_root: Path, protocol_version: str = CURRENT_VERSION) -> pd.DataFrame:
    """One row per cell (model × dataset × attack), flat columns."""
    rows = []
    for path, record in iter_cells(results_root, protocol_version):
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
            "eps": record.get("perturbation", {}).get("eps"), "perturbed": record.get("perturbed", "query"),
            "flags": ", ".join(record.get("sanity_flags", [])), "path": str(path),
        })
    columns = ["dataset", "split_hash", "model", "backbone", "defense", "attack", "threat_model", "clean_rank1",
               "clean_mAP", "rank1", "mAP", "mINP", "rr_rank1", "rr_mAP", "linf", "eps", "perturbed", "flags", "path"]
    return pd.DataFrame(rows, columns=columns).sort_values(["dataset", "model", "attack"], kind="stable").reset_index(drop=True)


def _pct(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{100 * float(value):.1f}"


def worst_case(cells: pd.DataFrame) -> dict:
    """Per query, the worst outcome over the given query-perturbing cells of one model:
    robust Rank-1 = share of queries whose first match stays on top under every attack,
    robust mAP = mean over queries of the lowest AP any attack reached."""
    cells = cells[cells["perturbed"] == "query"]
    if cells.empty:
        return {"rank1": None, "mAP": None, "attacks": 0}
    try:
        outcomes = [read_per_query(Path(p)) for p in cells["path"]]
    except (OSError, ValueError, KeyError):
        return {"rank1": None, "mAP": None, "attacks": len(cells)}  # a cell without per-query outcomes
    n = {len(o["attacked_ap"]) for o in outcomes}
    if len(n) != 1:
        return {"rank1": None, "mAP": None, "attacks": len(outcomes)}
    valid = outcomes[0]["clean_first_hit"] >= 0
    ap = np.min([o["attacked_ap"] for o in outcomes], axis=0)[valid]
    hit = np.all([o["attacked_first_hit"] == 0 for o in outcomes], axis=0)[valid]
    return {"rank1": float(hit.mean()), "mAP": float(np.nanmean(ap)), "attacks": len(outcomes)}


def cross_cell_flags(cells: pd.DataFrame) -> list[str]:
    """Flags that need several cells of one model: a black-box attack beating every white-box
    one smells of gradient masking (Athalye et al. 2018; Croce & Hein 2020)."""
    white = cells[cells["threat_model"] == "white-box"]["mAP"]
    black = cells[cells["threat_model"].isin(["transfer", "query-based"])]["mAP"]
    if len(white) and len(black) and black.min() < white.min() - 0.01:
        return ["black-box-beats-white-box"]
    return []


def dataset_tables(cells: pd.DataFrame) -> list[dict]:
    """Per dataset: one row per model with clean numbers, each attack's Rank-1 / mAP at the
    primary budget, and the per-query worst case (white-box only, and over every attack)."""
    tables = []
    for dataset, group in cells.groupby("dataset", sort=True):
        primary = group["eps"].dropna().min() if group["eps"].notna().any() else None
        if primary is not None:
            group = group[(group["eps"] - primary).abs() < 1e-9]
        order = {"white-box": 0, "transfer": 1, "query-based": 2}
        attacks = sorted(group["attack"].unique(),
                         key=lambda a: (order.get(group[group["attack"] == a]["threat_model"].iloc[0], 3), a))
        rows = []
        for model, mrows in group.groupby("model", sort=True):
            first = mrows.iloc[0]
            by_attack = {r.attack: r for r in mrows.itertuples()}
            white = worst_case(mrows[mrows["threat_model"] == "white-box"])
            overall = worst_case(mrows)
            flags = {f.strip() for f in ", ".join(mrows["flags"]).split(",") if f.strip()} | set(cross_cell_flags(mrows))
            rows.append({
                "model": model, "backbone": first.backbone, "defense": first.defense,
                "clean": (_pct(first.clean_rank1), _pct(first.clean_mAP)),
                "attacks": [(_pct(by_attack[a].rank1), _pct(by_attack[a].mAP)) if a in by_attack else ("–", "–")
                            for a in attacks],
                "worst_white": (_pct(white["rank1"]), _pct(white["mAP"])),
                "worst_all": (_pct(overall["rank1"]), _pct(overall["mAP"])),
                "flags": "; ".join(sorted(flags)),
            })
        tables.append({"dataset": dataset, "split_hashes": sorted(group["split_hash"].unique()), "attacks": attacks,
                       "eps255": None if primary is None else round(primary * 255, 3), "rows": rows})
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
    for path, text in ((index, html), (out_dir / "cells.csv", cells.drop(columns=["path"]).to_csv(index=False, float_format="%.6f"))):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return index
