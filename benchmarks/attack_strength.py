"""What AutoAttack's standard adds to the iterative attacks: Rank-1 / mAP of one model under
protocol v1's single run (last iterate), with the best iterate, and with the best iterate over
restarts (protocol v2), everything else as the runner runs it.

    python benchmarks/attack_strength.py MODEL_ID [--zoo FILE] [--attacks m-ifgsm sma lta odfa]
                                         [--eps-255 5 2] [--restarts 3]

Nothing goes into the cell store; the table is printed (record it in benchmarks/results/
with this command).
"""

from __future__ import annotations

import argparse
import time

from reidbench.protocol import load_protocol
from reidbench.runner import Runner
from reidbench.zoo import get_entry, load_zoo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--zoo", default=None)
    parser.add_argument("--attacks", nargs="+", default=["m-ifgsm", "sma", "lta", "odfa"])
    parser.add_argument("--eps-255", type=float, nargs="+", default=[5.0])
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    runner = Runner(load_zoo(args.zoo), protocol=load_protocol("v1"), device=args.device, progress=False, rerank=False)
    bundle = runner.bundle(get_entry(runner.zoo, args.model))
    feats = runner.clean_features(bundle)
    variants = [("v1: one run, last iterate", 1, False), ("best iterate", 1, True),
                (f"best iterate, {args.restarts} runs", args.restarts, True)]
    print(f"{args.model} ({bundle.split.name}, {len(bundle.split.query)} queries), step 1/255, "
          f"{runner.protocol.iterations} iterations; Rank-1 / mAP in %\n")
    print("| attack | ε | " + " | ".join(v[0] for v in variants) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in variants) + " |")
    clean = None
    for name in args.attacks:
        for eps_255 in args.eps_255:
            row = []
            for _, restarts, best in variants:
                attack = runner.make_attack(name, eps_255 / 255.0, bundle).strengthen(restarts, best)
                started = time.time()
                adv, *_ = runner.attack_images(bundle, attack)
                record, _ = runner.score(bundle, feats, adv, feats["gallery"])
                clean = record["clean"]
                a = record["attacked"]
                row.append(f"{100 * a['rank1']:.1f} / {100 * a['mAP']:.1f} ({time.time() - started:.0f} s)")
            print(f"| {name} | {eps_255:g}/255 | " + " | ".join(row) + " |")
    print(f"\nclean: {100 * clean['rank1']:.1f} / {100 * clean['mAP']:.1f}")


if __name__ == "__main__":
    main()
