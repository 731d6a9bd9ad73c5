"""A model's page: every cell of the model, robustness against ε (where it was run at two
budgets or more), an example query before and after the attack, and what produced the numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import pandas as pd

from ..record import CellRecord, ProtocolRef
from ..results import sweep_is_current_for
from .builders import first_value, model_table
from .plots import robustness_svg
from .records import is_missing

_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


def _thumbnail(value) -> Optional[str]:
    return value if isinstance(value, str) and _BASE64.match(value) else None


def example_figure(record: CellRecord) -> Optional[dict]:
    """The example query of a record as rows of tiles (thumbnail or index, match flag), or
    None when the record has no usable example block."""
    example = record.example
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
                "attack": record.attack_id, "eps": record.perturbation.eps if record.perturbation else None,
                "perturbed": record.perturbed if record.perturbed is not None else "query", "rows": rows}
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


def provenance(records: list[CellRecord]) -> list[tuple[str, str]]:
    """What produced a model's numbers; a field that differs between cells lists each value."""
    env = [r.environment or {} for r in records]
    protocols = [r.protocol or ProtocolRef() for r in records]
    rows = [("weights sha256", _distinct([r.model.weights_sha256 for r in records])),
            ("protocol", _distinct([f"{p.version} (fingerprint {p.fingerprint})" for p in protocols]))]
    packages = sorted({p for e in env for p in (e.get("versions") or {})})
    rows += [(f"{p} version", _distinct([(e.get("versions") or {}).get(p) for e in env])) for p in packages]
    rows += [("device", _distinct([r.device for r in records])), ("GPU", _distinct([e.get("cuda") for e in env])),
             ("CPU cores", _distinct([e.get("cpu_count") for e in env]))]
    if any(e.get("cpu_capability") for e in env):  # older records lack it: their pages stay as they were
        rows.append(("CPU kernels", _distinct([e.get("cpu_capability") for e in env])))
    if any(e.get("cpu_model") for e in env):
        rows.append(("CPU model", _distinct([e.get("cpu_model") for e in env])))
    rows += [("python", _distinct([e.get("python") for e in env])),
             ("platform", _distinct([e.get("platform") for e in env])),
             ("git commit", _distinct([e.get("git_commit") for e in env])),
             ("seed", _distinct([r.seed for r in records]))]
    return rows


def sweep_summary(finding: Optional[dict], records: list[CellRecord]) -> Optional[dict]:
    """The budget sweep's finding for the page (``reidbench sweep``): Rank-1 per
    iteration budget and the verdict; ``stale`` when it was measured on weights none of the
    model's cells has (a retraining since), so that it is never read as this model's."""
    if not isinstance(finding, dict) or not isinstance(finding.get("points"), dict):
        return None
    try:
        points = [{"iterations": int(n), "rank1": float(p["rank1"]), "interval": [float(v) for v in p["interval"]]}
                  for n, p in sorted(finding["points"].items(), key=lambda kv: int(kv[0]))]
    except (KeyError, TypeError, ValueError):
        return None
    if finding.get("at_floor"):
        verdict = "at the floor: the strongest cell's Rank-1 interval reaches 0, so no budget can flag it (not rerun)"
    elif finding.get("flag"):
        verdict = "budget-sensitive: Rank-1 at the largest budget is below the protocol budget's interval" + \
            (", and still falling at the last step" if finding.get("still_falling") else "")
    else:
        verdict = "converged: no budget took Rank-1 below the protocol budget's interval"
    return {"attack": finding.get("attack"), "points": points, "verdict": verdict,
            "stale": not sweep_is_current_for(finding, records),
            "command": finding.get("command")}


def model_page(model: str, cells: pd.DataFrame, entries: list[tuple[Path, CellRecord]],
               sweep: Optional[dict] = None) -> dict:
    """What a model's page shows, from its cells (rows of the flat table) and (path, record)
    pairs; ``sweep``: the budget sweep's finding for the model, if it was swept."""
    by_path = {str(path): record for path, record in entries}
    records = [record for _, record in entries]
    datasets = []
    for dataset, dcells in cells.groupby("dataset", sort=True):
        measured = dcells[dcells["standardized"].astype(bool)]
        plots = []
        for metric, key, clean_key in (("mAP", "mAP", "clean_mAP"), ("Rank-1", "rank1", "clean_rank1")):
            series: dict[str, list[tuple[float, float]]] = {}
            for r in measured.itertuples():
                if not is_missing(r.eps) and not is_missing(getattr(r, key)):
                    label = r.attack_name if r.perturbed == "query" else f"{r.attack_name} ({r.perturbed})"
                    series.setdefault(label, []).append((round(r.eps * 255, 3), float(getattr(r, key))))
            # A curve against ε needs two budgets; with one, the table says it all.
            if len({e for points in series.values() for e, _ in points}) >= 2:
                plots.append(robustness_svg(series, first_value(measured[clean_key]), metric))
        candidates = [r for r in measured.sort_values(["eps", "mAP", "attack"], kind="stable").itertuples()
                      if r.perturbed == "query" and example_figure(by_path[r.path]) is not None]
        primary = [r for r in candidates if r.eps == candidates[0].eps] if candidates else []
        datasets.append({"name": dataset, "plots": plots,
                         "example": example_figure(by_path[primary[0].path]) if primary else None})
    first = records[0].model
    return {
        "id": model, "backbone": first.backbone if first.backbone is not None else "",
        "defense": json.dumps(first.defense if first.defense is not None else "none", sort_keys=True),
        "train_dataset": _distinct([r.model.train_dataset for r in records]),
        "recipe": _distinct([r.model.recipe for r in records]),
        "architecture": _distinct([r.model.model for r in records]),
        "provenance": provenance(records), "datasets": datasets, "table": model_table(model, cells),
        "sweep": sweep_summary(sweep, records),
    }
