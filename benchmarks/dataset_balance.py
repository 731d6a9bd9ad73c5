"""How imbalanced a training split is, in the terms of DDID's data balancing: images per identity
(the long tail), the share of an identity's images its most frequent camera holds (camera
dominance), and what DDID's default balancing plan would generate for it.

    python benchmarks/dataset_balance.py [--presets small longtail] [--market DIR]

``--market`` reads a Market-1501-style ``bounding_box_train`` folder's file names
(``<pid>_c<camera>...jpg``) for comparison; no image is loaded.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from defenses.ddid.balance import plan_balance
from reidbench.data import build_dataset


def summary(pids: torch.Tensor, camids: torch.Tensor) -> str:
    ids, counts = torch.unique(pids, return_counts=True)
    shares = []
    for pid in ids:
        _, per_camera = torch.unique(camids[pids == pid], return_counts=True)
        shares.append(float(per_camera.max()) / float(per_camera.sum()))
    shares = torch.tensor(shares)
    plan = plan_balance(pids, camids)
    c = counts.float()
    return (f"| {len(ids)} | {len(pids)} | {int(c.min())} / {float(c.median()):g} / {float(c.mean()):.1f} / {int(c.max())} "
            f"| {100 * float(shares.mean()):.0f}% | {100 * float((shares > 0.5).float().mean()):.0f}% "
            f"| {plan.target} | {len(plan) - plan.diversify} + {plan.diversify} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "tiny-longtail", "small", "longtail"])
    parser.add_argument("--market", default=None, help="a bounding_box_train folder")
    args = parser.parse_args(argv)
    print("| training split | identities | images | per identity: min / median / mean / max "
          "| top camera's share (mean) | identities over 50% | DDID δ1 | DDID plan: top-up + camera |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        train = build_dataset("synthetic", preset=preset).train
        print(f"| synthetic {preset} " + summary(train.pids, train.camids))
    if args.market:
        names = [re.match(r"(-?\d+)_c(\d+)", p.name) for p in sorted(Path(args.market).glob("*.jpg"))]
        names = [m for m in names if m]
        pids = torch.tensor([int(m.group(1)) for m in names])
        camids = torch.tensor([int(m.group(2)) for m in names])
        print(f"| {Path(args.market).parent.name} " + summary(pids, camids))


if __name__ == "__main__":
    main()
