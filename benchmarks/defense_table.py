"""Markdown table of every defense under the attacks that judge it, from a result store:
clean and attacked Rank-1 / mAP (plain and re-ranked), one row per (dataset, defense).

    reidbench run --model <ids...> --attack m-ifgsm sma fna lta oblivious
    python benchmarks/defense_table.py results [m-ifgsm sma fna lta oblivious] [--variance m-ifgsm] [--protocol v1]

White-box cells go through the defense's input transform (EOT for a stochastic one, BPDA
for a non-differentiable one): they are the adaptive numbers. ``oblivious`` runs M-I-FGSM on
the network without the transform: the non-adaptive number. ``--variance ATTACK`` adds the
variance of per-identity Rank-1 (percent², DDID's bias measure; reidbench.metrics.fairness),
clean and under ATTACK. Every number is ``value ± half its 95% interval`` (bootstrap over
test identities); re-ranked numbers (in brackets) are non-adaptive: the attacks optimise plain
distances.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from reidbench.leaderboard import results_table, with_interval
from reidbench.protocol import CURRENT_VERSION

DEFAULT_ATTACKS = ["m-ifgsm", "sma", "fna", "lta", "oblivious"]


def _variance(row, column: str) -> str:
    value = None if row is None else getattr(row, column)
    if value is None or math.isnan(value):
        return "–"
    lo, hi = getattr(row, f"{column}_lo"), getattr(row, f"{column}_hi")
    return f"{value:.0f}" if math.isnan(lo) else f"{value:.0f} ± {(hi - lo) / 2:.0f}"


def pct(row, column: str) -> str:
    return with_interval(getattr(row, column), (getattr(row, f"{column}_lo"), getattr(row, f"{column}_hi")))


def attacked_text(row) -> str:
    """``Rank-1 / mAP``, with the re-ranked pair in brackets when the cell has one (a run with
    ``--no-rerank`` has none, and a bracket of dashes would read as a missing result)."""
    if row is None:
        return "–"
    text = f"{pct(row, 'rank1')} / {pct(row, 'mAP')}"
    reranked = [getattr(row, column) for column in ("rr_rank1", "rr_mAP")]
    if any(value is not None and not math.isnan(value) for value in reranked):
        text += f" ({pct(row, 'rr_rank1')} / {pct(row, 'rr_mAP')})"
    return text


def main(root: str, attacks: list[str], variance: str | None = None, protocol: str = CURRENT_VERSION) -> None:
    cells = results_table(Path(root), protocol)
    if cells.empty:
        print(f"no results under {root}")
        return
    cells = cells[(cells["eps"] * 255 - 5).abs() < 1e-6]
    for dataset, group in cells.groupby("dataset", sort=True):
        print(f"\n### {dataset}, ε = 5/255 (Rank-1 / mAP ± half the 95% interval; re-ranked, non-adaptive, in brackets)\n")
        header = ["model", "defense", "trained on", "clean"] + attacks
        if variance:
            header += ["identity var, clean", f"identity var, {variance}"]
        print("| " + " | ".join(header) + " |")
        print("| " + " | ".join("---" for _ in header) + " |")
        for model, rows in group.groupby("model", sort=True):
            first = rows.iloc[0]
            by_attack = {r.attack.rsplit("-eps", 1)[0]: r for r in rows.itertuples()}
            clean = f"{pct(first, 'clean_rank1')} / {pct(first, 'clean_mAP')}"
            out = [model, first.defense, first.train_dataset, clean]
            for name in attacks:
                r = by_attack.get(name)
                out.append(attacked_text(r))
            if variance:
                attacked = by_attack.get(variance)
                out += [_variance(first, "clean_var"), _variance(attacked, "var")]
            print("| " + " | ".join(out) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default="results")
    parser.add_argument("attacks", nargs="*", default=DEFAULT_ATTACKS)
    parser.add_argument("--variance", metavar="ATTACK", help="add per-identity Rank-1 variance, clean and under ATTACK")
    parser.add_argument("--protocol", default=CURRENT_VERSION, help=f"protocol version (default: {CURRENT_VERSION})")
    args = parser.parse_args()
    main(args.root, args.attacks or DEFAULT_ATTACKS, args.variance, args.protocol)
