"""Did a change move any number? Compare two runs of the same zoo, cell by cell and weight by weight.

    python benchmarks/compare_runs.py RESULTS_A RESULTS_B [--caches CACHE_A CACHE_B]

A cell is the same when its clean and attacked metrics (plain and re-ranked), its per-query
file's sha256, its perturbation statistics and its example row are equal; wall times,
environment and the weights file's sha256 are provenance, not numbers, and are left out (the
weights are compared by their tensors instead, with ``--caches``). Exit status 1 when anything
differs or when one run has cells the other lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NUMBERS = ("clean", "clean_reranked", "attacked", "attacked_reranked", "per_query_sha256", "perturbation", "example")


def compare_cells(a: Path, b: Path) -> list[str]:
    cells_a = {p.relative_to(a) for p in a.rglob("*.json")}
    cells_b = {p.relative_to(b) for p in b.rglob("*.json")}
    problems = [f"only in {a}: {p}" for p in sorted(cells_a - cells_b)]
    problems += [f"only in {b}: {p}" for p in sorted(cells_b - cells_a)]
    for rel in sorted(cells_a & cells_b):
        ra, rb = json.loads((a / rel).read_text()), json.loads((b / rel).read_text())
        problems += [f"{rel}: {key} differs" for key in NUMBERS if ra.get(key) != rb.get(key)]
    print(f"cells compared: {len(cells_a & cells_b)}")
    return problems


def compare_weights(a: Path, b: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    problems, compared = [], 0
    for path_a in sorted(a.glob("weights/*/model.safetensors")):
        path_b = b / path_a.relative_to(a)
        if not path_b.is_file():
            problems.append(f"weights only in {a}: {path_a.parent.name}")
            continue
        ta, tb = load_file(str(path_a)), load_file(str(path_b))
        compared += 1
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            problems.append(f"weights differ: {path_a.parent.name}")
    print(f"trained weights compared: {compared}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs=2, type=Path)
    parser.add_argument("--caches", nargs=2, type=Path)
    args = parser.parse_args(argv)
    problems = compare_cells(*args.results)
    if args.caches:
        problems += compare_weights(*args.caches)
    for line in problems:
        print(line)
    print("identical" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
