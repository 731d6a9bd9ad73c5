"""How an attack's result moves with its iteration budget: a gradient-masking check.

    python benchmarks/attack_budget.py MODEL_ID [--attack m-ifgsm] [--iterations 15 50 100 200]

Against a real defense, a white-box attack converges: more iterations change little. When a
defense only hides its gradient (a non-differentiable transform under BPDA, a stochastic one
under EOT), the attacked metric keeps falling as the budget grows, and the protocol's fixed
15 iterations overstate robustness (Athalye et al., ICML 2018; Carlini et al., "On Evaluating
Adversarial Robustness", 2019, §5). The cells are computed exactly as the runner computes
them (same model, transform, EOT/BPDA, seeds), with only ``iterations`` changed, and are not
written to the result store: a protocol cell always uses the protocol's budget.
"""

from __future__ import annotations

import argparse
import time

from reidbench.attack import build_attack
from reidbench.runner import Runner
from reidbench.zoo import get_entry, load_zoo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--attack", default="m-ifgsm")
    parser.add_argument("--iterations", type=int, nargs="+", default=[15, 50, 100, 200])
    parser.add_argument("--zoo", default=None)
    args = parser.parse_args(argv)

    zoo = load_zoo(args.zoo)
    runner = Runner(zoo, progress=False)
    bundle = runner.bundle(get_entry(zoo, args.model))
    feats = runner.clean_features(bundle)
    p = runner.protocol
    print(f"{args.model} under {args.attack}, ε = {p.eps * 255:g}/255, step {p.step * 255:g}/255 "
          "(Rank-1 / mAP in %; re-ranked in brackets)\n")
    print("| iterations | Rank-1 / mAP | re-ranked | seconds |")
    print("| --- | --- | --- | --- |")
    for iterations in args.iterations:
        template = runner.make_attack(args.attack, p.eps, bundle)
        attack = build_attack(args.attack, eps=p.eps, step=p.step, iterations=iterations, seed=p.seed)
        if hasattr(template, "eot_samples"):
            attack.eot_samples = template.eot_samples
        started = time.time()
        adv, *_ = runner.attack_images(bundle, attack)
        record, _ = runner.score(bundle, feats, adv, feats["gallery"])
        a, r = record["attacked"], record.get("attacked_reranked", {})
        print(f"| {iterations} | {100 * a['rank1']:.1f} / {100 * a['mAP']:.1f} | "
              f"{100 * r.get('rank1', float('nan')):.1f} / {100 * r.get('mAP', float('nan')):.1f} | "
              f"{time.time() - started:.0f} |")
    clean = record["clean"]
    print(f"\nclean: {100 * clean['rank1']:.1f} / {100 * clean['mAP']:.1f}")


if __name__ == "__main__":
    main()
