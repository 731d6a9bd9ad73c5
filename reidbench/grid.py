"""Which cells a protocol defines: the (model, attack, ε) grid of a run, the cells it leaves
out and why, and the check that a protocol's attacks can run at all. The runner runs what this
plans; the CLI, the executors, the API and the leaderboard (its "not run" marks) ask it too.
"""

from __future__ import annotations

from typing import Iterator, Optional

from .defense import build_defense
from .errors import ReIDBenchError
from .progress import log
from .protocol import Protocol
from .registry import ATTACKS
from .zoo import ZooEntry


def protocol_grid(protocol: Protocol, entries: list[ZooEntry], attacks: Optional[list[str]] = None,
                  eps_values: Optional[list[float]] = None,
                  test_dataset: Optional[str] = None) -> Iterator[tuple[ZooEntry, str, float]]:
    """The (entry, attack, ε) cells of a run, in grid order, each on ``test_dataset`` or the
    entry's own; a cell the protocol does not define (:func:`undefined_cell`) is left out, and
    the log says why. Every executor walks the grid through here.

    ``attacks`` None is the protocol's whole suite, what ``run --all`` runs: its grid at the
    primary ε (or ``eps_values``), its secondary attacks at the secondary ε
    (:attr:`Protocol.secondary_attacks`), and, against a model whose defense transforms its
    input, the oblivious attack: the non-adaptive reference beside the adaptive cells."""
    for entry in entries:
        if attacks is not None:
            plan = [(attacks, eps_values or [protocol.eps])]
        else:
            plan = [(protocol.attacks(), eps_values or [protocol.eps])]
            if eps_values is None:
                plan.append((protocol.secondary_attacks, [protocol.eps_secondary]))
            if transforms_input(entry.defense):
                plan.append((["oblivious"], eps_values or [protocol.eps]))
        for names, budgets in plan:
            for name in names:
                reason = undefined_cell(protocol, name, test_dataset or entry.dataset_name, entry.defense)
                if reason:
                    log(f"[yellow]–[/] {entry.id} × {name}: not run ({reason})")
                    continue
                for eps in budgets:
                    yield entry, name, eps


def transforms_input(defense: dict) -> bool:
    """Whether the defense a zoo entry names (its ``defense`` mapping) transforms the input."""
    return build_defense(defense).input_transform() is not None


def undefined_cell(protocol: Protocol, attack_name: str, dataset_name: str,
                   defense: Optional[dict] = None) -> Optional[str]:
    """Why ``protocol`` defines no cell for ``attack_name`` on ``dataset_name``; None when it
    does. A transfer attack needs the surrogate the protocol fixes for the dataset, and a
    surrogate of our choosing would make the number incomparable, so where the protocol fixes
    none (e.g. v1 on video data) the cell does not exist. With ``defense`` (the entry's), an
    attack that aims with the bare network (the oblivious attack) has no cell on a model whose
    defense transforms no input: there it would repeat its inner attack's cell."""
    needs = ATTACKS.get(attack_name).needs_for()
    if "surrogate" in needs and not protocol.has_surrogate(dataset_name):
        return f"protocol {protocol.version} fixes no transfer surrogate for dataset '{dataset_name}'"
    if "bare" in needs and defense is not None and not transforms_input(defense):
        return "its defense transforms no input, so the oblivious attack is M-I-FGSM itself"
    return None


def check_attack_names(attacks: list[str], protocol: Optional[Protocol] = None) -> None:
    """Fail on a bad attack name before any work is done; with ``protocol``, also on a protocol
    the registry cannot run as written: a grid attack or variant that is not registered, or a
    grid attack perturbing another side than the protocol's ``perturbed``."""
    for name in attacks:
        ATTACKS.get(name)
    if protocol is not None:
        for name in protocol.variants:
            ATTACKS.get(name)
        for name in protocol.attacks():
            side = ATTACKS.get(name).perturbs
            if side != protocol.perturbed:
                raise ReIDBenchError(f"protocol {protocol.version}: grid attack '{name}' perturbs the "
                                     f"{side}, the protocol the {protocol.perturbed}")
