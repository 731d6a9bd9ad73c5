"""Every number of a result store with its 95% interval, re-read from the records and their
per-query files: for tables written before protocol v2 stored intervals.

    python benchmarks/intervals.py results                        # the current protocol's cells
    python benchmarks/intervals.py results --protocol v1 --attacks m-ifgsm sma fna lta

One markdown table per dataset and ε: per cell, clean and attacked Rank-1 / mAP / mINP and
the per-identity Rank-1 variance, each as ``value ± half-width`` (a bootstrap over test
identities, seeded; ``reidbench.metrics.bootstrap``), then per model the per-query worst case
over the listed attacks (all query-perturbing cells by default) with its interval. A record
that stores its intervals is read as is; an older one gets them from its ``.npz`` (mINP only
where that file has per-query INP). Re-ranked numbers are left out: under attack they are
non-adaptive.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from reidbench.checks import worst_case  # noqa: E402
from reidbench.errors import ReIDBenchError  # noqa: E402
from reidbench.leaderboard import results_table, with_interval  # noqa: E402
from reidbench.protocol import CURRENT_VERSION  # noqa: E402

METRICS = [("clean R-1", "clean_rank1"), ("clean mAP", "clean_mAP"), ("R-1", "rank1"), ("mAP", "mAP"), ("mINP", "mINP")]


def _var(value, lo, hi) -> str:
    return with_interval(value, (lo, hi), scale=1.0)


def main(root: str, protocol: str, attacks: list[str] | None) -> None:
    cells = results_table(Path(root), protocol)
    cells = cells[cells["standardized"].astype(bool)]
    if cells.empty:
        print(f"no measured results of protocol {protocol} under {root}")
        return
    cells = cells.assign(eps255=[round(e * 255, 3) for e in cells["eps"]])
    for (dataset, eps255), group in cells.groupby(["dataset", "eps255"], sort=True):
        print(f"\n### {dataset}, ε = {eps255:g}/255, protocol {protocol} (value ± half the 95% interval)\n")
        header = ["model", "attack"] + [name for name, _ in METRICS] + ["identity var, clean", "identity var"]
        print("| " + " | ".join(header) + " |")
        print("| " + " | ".join("---" for _ in header) + " |")
        for row in group.sort_values(["model", "attack"]).itertuples():
            out = [row.model, row.attack]
            out += [with_interval(getattr(row, col), (getattr(row, f"{col}_lo"), getattr(row, f"{col}_hi")))
                    for _, col in METRICS]
            out += [_var(row.clean_var, row.clean_var_lo, row.clean_var_hi), _var(row.var, row.var_lo, row.var_hi)]
            print("| " + " | ".join(str(x) for x in out) + " |")
        chosen = group if not attacks else group[group["attack_name"].isin(attacks)]
        print(f"\nPer-query worst case over {', '.join(attacks) if attacks else 'every query-perturbing attack'}:\n")
        print("| model | attacks | worst R-1 | worst mAP | identity var | stale cells left out |")
        print("| --- | --- | --- | --- | --- | --- |")
        for model, mcells in chosen.groupby("model", sort=True):
            w = worst_case(mcells)
            var = "–" if w["identity_var"] is None else _var(w["identity_var"], *(w["identity_var_ci"] or (math.nan,) * 2))
            print(f"| {model} | {w['attacks']} | {with_interval(w['rank1'], w['rank1_ci'])} | "
                  f"{with_interval(w['mAP'], w['mAP_ci'])} | {var} | {' '.join(w['stale']) or '–'} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default="results")
    parser.add_argument("--protocol", default=CURRENT_VERSION, help=f"protocol version (default: {CURRENT_VERSION})")
    parser.add_argument("--attacks", nargs="*", help="attack names of the worst case (default: all)")
    args = parser.parse_args()
    try:
        main(args.root, args.protocol, args.attacks)
    except ReIDBenchError as exc:
        raise SystemExit(f"intervals: error: {exc}") from None
