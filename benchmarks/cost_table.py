"""Where a run's time goes: one row per cell type (attack at an ε, summed over models) and per
training job, with its wall time and share of the whole run.

    python benchmarks/cost_table.py RESULTS [--cache DIR] [--total SECONDS] > cost.md

Cells carry ``wall_time_s``; training jobs their ``training.json`` beside the weights in the
cache (``reidbench.train.loop.training_record``; weights trained before it was kept show
"not recorded"). ``--total`` is the whole run's measured wall time (e.g. from ``/usr/bin/time``):
with it, shares are of the whole run and the rest (datasets, loading, rendering) gets a row;
without it, shares are of the rows' sum.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from reidbench.cache import cache_dir
from reidbench.results import iter_cells
from reidbench.train.loop import training_record


def cell_rows(results: Path) -> dict[str, list[float]]:
    rows = defaultdict(list)
    for _, record in iter_cells(results):
        if record.wall_time_s is not None:
            # one type per attack and ε, summed over models: what the grid pays per cell type
            rows[f"cell {record.attack_id}"].append(float(record.wall_time_s))
    return rows


def training_rows(cache: Path) -> dict[str, list[float]]:
    rows = {}
    for folder in sorted((cache / "weights").glob("*")):
        if (folder / "model.safetensors").is_file():
            record = training_record(folder)
            name = re.sub(r"-[0-9a-f]{12}$", "", folder.name)  # drop the recipe key
            rows[f"train {name}"] = [float(record["wall_time_s"])] if record else []
    return rows


def table(results: Path, cache: Path, total: float | None = None) -> str:
    rows = {**cell_rows(results), **training_rows(cache)}
    known = sum(sum(v) for v in rows.values())
    whole = total if total is not None else known
    lines = ["| job | count | wall time (s) | share |", "| --- | --- | --- | --- |"]
    for name, times in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
        if not times:
            lines.append(f"| {name} | 1 | not recorded | – |")
            continue
        lines.append(f"| {name} | {len(times)} | {sum(times):.1f} | {100 * sum(times) / whole:.1f}% |")
    if total is not None:
        lines.append(f"| rest (datasets, loading, unrecorded training, render) | – | {total - known:.1f} | "
                     f"{100 * (total - known) / total:.1f}% |")
    lines.append(f"| **total** | – | {whole:.1f} | 100% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--cache", type=Path, default=None, help="the run's cache (default: $REIDBENCH_CACHE)")
    parser.add_argument("--total", type=float, default=None, help="the whole run's wall time in seconds")
    args = parser.parse_args(argv)
    print(table(args.results, args.cache or cache_dir(), args.total), end="")


if __name__ == "__main__":
    main()
