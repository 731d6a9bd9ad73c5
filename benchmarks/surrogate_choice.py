"""Which surrogate makes the transfer attack mean something: the protocol's transfer attack on
target models, crafted on each candidate surrogate, beside each surrogate's own clean Rank-1.

    python benchmarks/surrogate_choice.py --targets ID [ID ...] --surrogates ID [ID ...]
                                          [--zoo FILE] [--protocol VERSION] [--device auto]

A transfer cell measures the surrogate as much as the target: a surrogate that has barely
learned the task crafts perturbations that barely transfer, and every target then looks
robust to transfer. A protocol fixes one surrogate per dataset (``transfer.surrogates``), so
choosing another is a new protocol version; this script is the evidence for that choice. It
runs the protocol's transfer attack (its inner attack, budget, restarts and best iterate)
exactly as the runner does, with only the surrogate swapped, and prints Rank-1 / mAP with
their 95% identity-bootstrap intervals. Nothing goes into the cell store; record the table
in benchmarks/results/ with this command.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

from reidbench.attack import build_attack
from reidbench.errors import ReIDBenchError
from reidbench.protocol import CURRENT_VERSION, load_protocol
from reidbench.runner import Runner
from reidbench.zoo import ZooEntry, get_entry, load_zoo


class SwappedSurrogateRunner(Runner):
    """The runner with the surrogate of every transfer attack set by hand (``surrogate_id``)."""

    surrogate_id: str = ""

    def surrogate_entry(self, dataset_name: str) -> ZooEntry:
        return get_entry(self.zoo, self.surrogate_id)


def _cell(metrics: dict) -> str:
    ci = metrics.get("ci95") or {}
    parts = []
    for key in ("rank1", "mAP"):
        lo, hi = ci.get(key, (metrics[key], metrics[key]))
        parts.append(f"{100 * metrics[key]:.1f} ± {50 * (hi - lo):.1f}")
    return " / ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", required=True)
    parser.add_argument("--surrogates", nargs="+", required=True)
    parser.add_argument("--zoo", default=None)
    parser.add_argument("--protocol", default=CURRENT_VERSION)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        zoo = load_zoo(args.zoo)
        for model_id in args.targets + args.surrogates:
            get_entry(zoo, model_id)
        protocol = load_protocol(args.protocol)
        runner = SwappedSurrogateRunner(zoo, protocol=protocol, device=args.device, progress=True, rerank=False)
        print(f"protocol {protocol.version}: transfer = {protocol.transfer_attack} on the surrogate, "
              f"ε = {protocol.eps * 255:g}/255, {protocol.iterations} iterations, {protocol.restarts} restarts; "
              f"Rank-1 / mAP in % ± half the 95% interval; {platform.node()}\n")
        rows = []
        for surrogate in args.surrogates:
            runner.surrogate_id = surrogate
            own = runner.bundle(get_entry(zoo, surrogate))
            feats = runner.clean_features(own)
            own_clean, _ = runner.score(own, feats, feats["query"], feats["gallery"])
            for target in args.targets:
                if target == surrogate:
                    continue
                bundle = runner.bundle(get_entry(zoo, target))
                feats = runner.clean_features(bundle)
                attack = build_attack("transfer", eps=protocol.eps, step=protocol.step, iterations=protocol.iterations,
                                      seed=protocol.seed, **{**protocol.attack_params("transfer"), "surrogate": surrogate})
                attack.strengthen(restarts=protocol.restarts, best_iterate=protocol.best_iterate)
                started = time.time()
                adv, *_ = runner.attack_images(bundle, attack)
                record, _ = runner.score(bundle, feats, adv, feats["gallery"])
                rows.append((target, surrogate, _cell(own_clean["clean"]), own.weights_sha256[:8], _cell(record["clean"]),
                             _cell(record["attacked"]), time.time() - started))
        print("| target | surrogate | surrogate's clean | surrogate sha256 | target's clean | transfer | seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for target, surrogate, own_clean, sha, clean, attacked, seconds in rows:
            print(f"| {target} | {surrogate} | {own_clean} | {sha}… | {clean} | {attacked} | {seconds:.0f} |")
    except ReIDBenchError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
