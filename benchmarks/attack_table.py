"""Markdown table of clean vs attacked Rank-1 / mAP per attack, from a result store, with
the numbers the papers report for Market-1501 beside ours.

    python benchmarks/attack_table.py results [PROTOCOL] > benchmarks/results/attacks.md

Rank-1 / mAP as ``value ± half the 95% interval`` (bootstrap over test identities);
re-ranked numbers are non-adaptive (the attacks optimise plain distances).
"""

from __future__ import annotations

import sys
from pathlib import Path

from reidbench.checks import worst_case
from reidbench.leaderboard import results_table, with_interval
from reidbench.protocol import CURRENT_VERSION

# Published Market-1501 numbers (undefended models, ε = 5/255 unless stated), as reported
# in the papers' tables; "–" where a paper does not report the attack.
PAPERS = {
    "sma": "Bouniot 2020: mAP 76 → ~2 (ResNet-50); Gong 2022: R-1 88.4 → 15.7",
    "fna": "Bouniot 2020: mAP 76 → <1",
    "lta": "Gong 2022: R-1 88.4 → 13.3",
    "m-ifgsm": "Bai 2019 perturb the gallery at larger ε; no query-side figure to compare",
    "m-ifgsm-gallery": "Bai 2019: the original gallery-perturbing setting",
    "dmr": "Wang 2020 train G for ~50 epochs on a GPU at ε = 16; not comparable at ε = 5 / 300 CPU steps",
}


def ci(row, column: str) -> str:
    return with_interval(getattr(row, column), (getattr(row, f"{column}_lo"), getattr(row, f"{column}_hi")))


def main(root: str, protocol: str = CURRENT_VERSION) -> None:
    cells = results_table(Path(root), protocol)
    if cells.empty:
        print(f"no results under {root}")
        return
    cells["eps255"] = (cells["eps"].fillna(0) * 255).round(3)
    for (dataset, model, eps255), group in cells.groupby(["dataset", "model", "eps255"], sort=True):
        first = group.iloc[0]
        print(f"\n### {dataset} — {model} — ε = {eps255:g}/255\n")
        print(f"Clean: Rank-1 {ci(first, 'clean_rank1')}, mAP {ci(first, 'clean_mAP')} (split {first.split_hash}).\n")
        print("| attack | threat model | ε (/255) | Rank-1 | mAP | re-ranked R-1 (non-adaptive) | re-ranked mAP (non-adaptive) "
              "| L∞ used | flags | papers (Market-1501) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in group.sort_values(["threat_model", "attack"]).itertuples():
            eps = "–" if row.eps is None else f"{row.eps * 255:g}"
            linf = "–" if row.linf is None else f"{row.linf * 255:.2f}/255"
            name = row.attack.rsplit("-eps", 1)[0]
            print(f"| {row.attack} | {row.threat_model} | {eps} | {ci(row, 'rank1')} | {ci(row, 'mAP')} | {ci(row, 'rr_rank1')} | "
                  f"{ci(row, 'rr_mAP')} | {linf} | {row.flags or ''} | {PAPERS.get(name, '–')} |")
        for label, subset in (("white-box", group[group.threat_model == "white-box"]), ("every attack", group)):
            worst = worst_case(subset)
            print(f"\nWorst case per query over {label} ({worst['attacks']} cells): "
                  f"Rank-1 {with_interval(worst['rank1'], worst['rank1_ci'])}, "
                  f"mAP {with_interval(worst['mAP'], worst['mAP_ci'])}"
                  + (f"; stale cells left out: {' '.join(worst['stale'])}." if worst["stale"] else "."))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results", sys.argv[2] if len(sys.argv) > 2 else CURRENT_VERSION)
