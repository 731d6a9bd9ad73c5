"""The budget sweep: does a defended model's Rank-1 keep falling when the strongest white-box
attack gets more iterations? A gradient-masking check of protocol v2 (``reidbench sweep``).

    reidbench sweep MODEL_ID [MODEL_ID ...] [--iterations 15 100 500]
    reidbench sweep --all [--suite NAME ...]     # every defended zoo model (of these suites)
    options: --attack NAME (else the strongest in the store), --protocol VERSION, --results DIR,
             --site DIR (the leaderboard, re-rendered with the flags; --no-render to skip)

It sits beside :mod:`reidbench.validate` as a driving module, not in :mod:`reidbench.checks`:
it attacks (through the runner), where the checks there only read cells.

Against a real defense, a white-box attack converges: more iterations change little. When a
defense only hides its gradient (a non-differentiable transform under BPDA, a stochastic one
under EOT), the attacked metric keeps falling as the budget grows, and the protocol's fixed
budget overstates robustness (Athalye et al., ICML 2018; Carlini et al., "On Evaluating
Adversarial Robustness", 2019, §5).

For each model the attack is, unless ``--attack`` names one, the protocol's strongest
white-box attack against it: the white-box cell of the result store (at the protocol's ε) with
the lowest attacked Rank-1, among the attacks whose iteration count can change (not m-fgsm's
single step, not a universal perturbation). It runs as the runner runs it (same model,
transform, EOT / BPDA, restarts and best iterate, seeds), once, to the largest budget: every
smaller budget is a snapshot of that run, and each query stops once its match has left Rank-1
(``IterativeMetricAttack.perturb_by_budget`` says what that changes: Rank-1 nothing, mAP is an
early-stopping attack's, hence only Rank-1 decides). The model is **flagged**
(``budget-sensitive``) when Rank-1 at the largest budget is below the lower end of the 95%
identity-bootstrap interval of Rank-1 at the protocol's budget; ``still_falling`` says whether
the last step (e.g. 100 → 500) alone still lowers it below the previous budget's interval,
i.e. whether even the largest budget may not have converged. The protocol-budget point is
printed beside the store's cell, which it should equal on a deterministic model. On a
stochastic one (EOT) every budget is embedded under the same transform draws (common random
numbers), so the budgets differ by the attack alone; the store's cell was scored under other
draws, and its gap to the protocol-budget point is the evaluation's own noise, which the
identity-bootstrap interval does not include.

A model whose strongest stored cell has a Rank-1 interval reaching 0 is **at the floor**: no
budget can take Rank-1 below that interval's lower end, so it cannot be flagged, and it is
recorded as such from the store without training or attacking it (``--rerun-floor`` attacks
it anyway).

Nothing goes into the cell store (a protocol cell always uses the protocol's budget). The
findings go to ``<results>/budget-sweep/<version>.json`` (one entry per model, merged with
earlier runs, with the command that produced them; written after each model, so an
interrupted sweep keeps the models it finished, and a rerun sweeps only the models without a
current finding that answers it; ``--force`` sweeps all again), which
``reidbench.results.read_budget_sweep`` reads for the leaderboard; ``reidbench validate``
requires it of a defended submission.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .attack import build_attack
from .cache import atomic_write, locked
from .errors import ReIDBenchError
from .progress import log
from .results import BUDGET_FLAG, budget_sweep_path, iter_cells, read_budget_sweep, sweep_is_current_for
from .runner import Runner
from .zoo.schema import get_entry

FALLBACK_ATTACK = "m-ifgsm"


def rank1_interval(first_hit, query_pids, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> list[float]:
    """[lo, hi] of Rank-1 by resampling test identities (a query moves with its identity), for
    a record that carries none (protocol v1's)."""
    first_hit, query_pids = np.asarray(first_hit), np.asarray(query_pids)
    valid = first_hit >= 0
    _, inverse = np.unique(query_pids[valid], return_inverse=True)
    hits = np.bincount(inverse, weights=(first_hit[valid] == 0).astype(np.float64))
    counts = np.bincount(inverse).astype(np.float64)
    draws = np.random.default_rng(seed).multinomial(len(counts), np.full(len(counts), 1.0 / len(counts)), size=resamples)
    rank1 = (draws @ hits) / np.maximum(draws @ counts, 1.0)
    tail = (1.0 - level) / 2
    return [float(np.quantile(rank1, tail)), float(np.quantile(rank1, 1.0 - tail))]


def assess(points: dict[int, dict], protocol_iterations: int) -> dict:
    """The flag from ``{iterations: {"rank1": r, "interval": [lo, hi]}}``: Rank-1 at the largest
    budget below the interval at the protocol's budget (or the smallest one swept)."""
    budgets = sorted(points)
    base = protocol_iterations if protocol_iterations in points else budgets[0]
    last = points[budgets[-1]]["rank1"]
    previous = points[budgets[-2]] if len(budgets) > 1 else points[base]
    return {"base_iterations": base,
            "drop": points[base]["rank1"] - last,
            "flag": bool(last < points[base]["interval"][0]),
            "still_falling": bool(len(budgets) > 1 and last < previous["interval"][0])}


def sweepable(name: str, protocol) -> bool:
    """Whether the attack's iteration count is a real knob (m-fgsm fixes one step; UAP and the
    learned attacks have no loop over a query)."""
    probe = build_attack(name, eps=protocol.eps, step=protocol.step, iterations=protocol.iterations + 1)
    return probe.threat_model == "white-box" and probe.sweepable


def strongest_cell(results_root: Path, protocol, dataset: str, model_id: str):
    """The model's white-box cell (at the protocol's ε and fingerprint) with the lowest Rank-1
    among the sweepable attacks, or None."""
    best = None
    for _, record in iter_cells(Path(results_root) / protocol.version / dataset / model_id):
        if record.threat_model != "white-box" or (record.perturbed or "query") != "query" or not record.measured:
            continue
        if record.protocol is None or record.protocol.fingerprint != protocol.fingerprint():
            continue
        eps = record.perturbation.eps if record.perturbation and record.perturbation.eps is not None else -1
        if abs(float(eps) - protocol.eps) > 1e-9:
            continue
        name = record.attack["name"]
        if name not in _known_attacks() or not sweepable(name, protocol):
            continue
        key = (record.attacked.rank1, record.attacked.mAP, name)
        if best is None or key < best[0]:
            best = (key, record)
    return best[1] if best else None


def _known_attacks() -> set[str]:
    from .registry import ATTACKS

    return set(ATTACKS.names())


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def at_floor(record) -> bool:
    """Whether the cell's Rank-1 interval reaches 0: then nothing can fall below it."""
    interval = record.attacked.stored_interval("rank1")
    return interval is not None and float(interval[0]) <= 0.0


def floor_finding(record) -> dict:
    interval = [float(v) for v in record.attacked.stored_interval("rank1")]
    iterations = int(record.attack.get("iterations", 0))
    return {"attack": record.attack["name"], "attack_chosen_by": "lowest white-box Rank-1 in the store",
            "at_floor": True, "flag": False, "still_falling": False, "flag_name": None, "drop": None,
            "points": {str(iterations): {"rank1": record.attacked.rank1, "mAP": record.attacked.mAP,
                                         "interval": interval, "from": "store"}},
            "base_iterations": iterations, "clean_rank1": record.clean.rank1 if record.clean else None,
            "weights_sha256": record.model.weights_sha256, "split_hash": record.dataset.split_hash,
            "dataset": record.dataset.name, "when": _stamp()}


def sweep_model(runner: Runner, model_id: str, iterations: list[int], attack_name: Optional[str],
                rerun_floor: bool = False) -> dict:
    protocol = runner.protocol
    entry = get_entry(runner.zoo, model_id)
    stored = None
    chosen_by = "--attack"
    if attack_name is None:
        stored = strongest_cell(runner.results_root, protocol, entry.dataset_name, model_id)
        if stored is not None and at_floor(stored) and not rerun_floor:
            return floor_finding(stored)
        attack_name, chosen_by = (stored.attack["name"], "lowest white-box Rank-1 in the store") if stored else \
            (FALLBACK_ATTACK, "no white-box cell in the store: fallback")
    if not sweepable(attack_name, protocol):
        raise ReIDBenchError(f"attack '{attack_name}' has no iteration count to sweep")
    bundle = runner.bundle(entry)
    feats = runner.clean_features(bundle)
    attack = runner.make_attack(attack_name, protocol.eps, bundle)
    started = time.time()
    by_budget, _ = runner.attack_images_by_budget(bundle, attack, iterations)
    seconds = round(time.time() - started, 1)
    points = {}
    for n, adv in sorted(by_budget.items()):
        record, per_query = runner.score(bundle, feats, adv, feats["gallery"])
        attacked = record["attacked"]
        interval = (attacked.get("ci95") or {}).get("rank1") or rank1_interval(
            per_query["attacked_first_hit"], per_query["query_pids"], seed=protocol.seed)
        points[int(n)] = {"rank1": attacked["rank1"], "mAP": attacked["mAP"], "interval": [float(v) for v in interval]}
    verdict = assess(points, protocol.iterations)
    finding = {"attack": attack_name, "attack_chosen_by": chosen_by, "attack_settings": attack.describe(),
               "clean_rank1": record["clean"]["rank1"], "points": {str(k): v for k, v in points.items()}, **verdict,
               "flag_name": BUDGET_FLAG if verdict["flag"] else None, "seconds": seconds,
               "mAP_note": "mAP of an attack that stops each query once its match left Rank-1",
               "weights_sha256": bundle.weights_sha256, "split_hash": bundle.split.split_hash,
               "dataset": bundle.split.name, "when": _stamp()}
    if stored is not None and stored.model.weights_sha256 == bundle.weights_sha256:
        finding["store_cell_rank1"] = stored.attacked.rank1
    return finding


def write_findings(results_root: Path, protocol, findings: dict[str, dict], command: str) -> Path:
    """Merge ``findings`` into the folder's findings file, under a lock: sweeps of different
    models may run side by side on one result folder."""
    path = budget_sweep_path(results_root, protocol.version)
    with locked(path):
        # Each earlier finding keeps the fingerprint it was measured under (read_budget_sweep
        # fills it in for older files): a protocol edit since makes it stale, it must not
        # inherit the new one.
        try:
            models = dict(read_budget_sweep(results_root, protocol.version, strict=True))
        except ReIDBenchError as exc:  # keep the unreadable file for a human, and the new finding
            aside = path.with_name(f"{path.name}.unreadable")
            path.replace(aside)
            log(f"[yellow]warning:[/] {exc}; moved to {aside}, starting a new one")
            models = {}
        for model_id, finding in findings.items():
            models[model_id] = {**finding, "command": command, "protocol_fingerprint": protocol.fingerprint()}
        payload = {"schema": 1, "protocol": {"version": protocol.version, "fingerprint": protocol.fingerprint()},
                   "flag": BUDGET_FLAG, "models": models}
        atomic_write(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode(), check=False)
    return path


def defended_ids(zoo: dict, suites: Optional[list[str]] = None) -> list[str]:
    """Every defended zoo entry, or those of ``suites`` ('all': every one), in zoo order (``--all``)."""
    return [e.id for e in zoo.values() if e.defended and (not suites or "all" in suites or set(suites) & set(e.suite or []))]


def _model_cells(results_root: Path, protocol, entry) -> list:
    return [r for _, r in iter_cells(Path(results_root) / protocol.version / entry.dataset_name / entry.id)]


def current_finding(results_root: Path, protocol, entry) -> Optional[dict]:
    """The entry's finding when it was measured on the weights and under the protocol of its
    cells in the store (``results.sweep_is_current``); None without cells or without such a finding."""
    finding = read_budget_sweep(results_root, protocol.version).get(entry.id)
    return finding if sweep_is_current_for(finding, _model_cells(results_root, protocol, entry)) else None


def unswept(results_root: Path, protocol, entries) -> list[str]:
    """The defended ``entries`` with cells in the store but no current finding (none, or one of
    other weights or another protocol fingerprint than their cells): what ``run`` reminds of."""
    found = read_budget_sweep(results_root, protocol.version)
    missing = []
    for entry in (e for e in entries if e.defended):
        records = _model_cells(results_root, protocol, entry)
        if records and not sweep_is_current_for(found.get(entry.id), records):
            missing.append(entry.id)
    return missing


def kept_finding(runner: Runner, entry, budgets: list[int], attack_name: Optional[str], rerun_floor: bool) -> Optional[dict]:
    """A current finding that already answers this request (same attack, or still the strongest
    cell's; every budget asked for; a floor finding unless --rerun-floor), so a rerun after an
    interruption, or after one more defense joined the zoo, sweeps only what is missing."""
    finding = current_finding(runner.results_root, runner.protocol, entry)
    if finding is None or (finding.get("at_floor") and (rerun_floor or attack_name is not None)):
        return None
    if attack_name is None:
        strongest = strongest_cell(runner.results_root, runner.protocol, entry.dataset_name, entry.id)
        attack_name = strongest.attack["name"] if strongest is not None else None
    if finding.get("attack") != attack_name:
        return None
    return finding if finding.get("at_floor") or {str(n) for n in budgets} <= set(finding.get("points", {})) else None


def sweep(runner: Runner, model_ids: list[str], iterations: list[int], attack_name: Optional[str] = None,
          rerun_floor: bool = False, command: str = "", force: bool = False) -> Iterator[tuple[str, dict, Path]]:
    """Sweep each model in turn, writing its finding before the next starts (an interrupted
    sweep keeps what it finished, and a rerun keeps every current finding that answers it
    (:func:`kept_finding`) unless ``force``); yields (model id, finding, the findings file)."""
    if not model_ids:
        raise ReIDBenchError("name at least one model, or --all")
    if any(n < 1 for n in iterations):
        raise ReIDBenchError(f"--iterations takes counts >= 1, got {iterations}")
    for model_id in model_ids:
        get_entry(runner.zoo, model_id)  # an unknown id is one line before any model is attacked
    return _each(runner, model_ids, sorted(set(iterations)), attack_name, rerun_floor, command, force)


def _each(runner, model_ids, budgets, attack_name, rerun_floor, command, force):
    for model_id in model_ids:
        kept = None if force else kept_finding(runner, get_entry(runner.zoo, model_id), budgets, attack_name, rerun_floor)
        if kept is not None:
            yield model_id, {**kept, "kept": True}, budget_sweep_path(runner.results_root, runner.protocol.version)
            continue
        finding = sweep_model(runner, model_id, budgets, attack_name, rerun_floor=rerun_floor)
        yield model_id, finding, write_findings(runner.results_root, runner.protocol, {model_id: finding}, command)


def report(runner: Runner, model_ids: list[str], iterations: list[int], attack_name: Optional[str] = None,
           rerun_floor: bool = False, command: str = "", force: bool = False) -> Optional[Path]:
    """:func:`sweep`, printed as a Markdown table row by row; returns the findings file."""
    findings = sweep(runner, model_ids, iterations, attack_name, rerun_floor, command, force)
    protocol, budgets = runner.protocol, sorted(set(iterations))
    print(f"protocol {protocol.version}, ε = {protocol.eps * 255:g}/255, step {protocol.step * 255:g}/255; "
          f"Rank-1 in % [95% interval]; {platform.node()}\n")
    print("| model | attack | " + " | ".join(f"{n} it." for n in budgets) + " | store's cell | flag | seconds |")
    print("| --- | --- | " + " | ".join("---" for _ in budgets) + " | --- | --- | --- |")
    path = None
    for model_id, finding, path in findings:
        print(table_row(model_id, finding, budgets), flush=True)
    print(f"\nwritten: {path}")
    return path


def table_row(model_id: str, finding: dict, budgets: list[int]) -> str:
    """The finding as one row of the Markdown table ``reidbench sweep`` prints."""
    points = finding["points"]
    cells = [f"{100 * points[str(n)]['rank1']:.1f} [{100 * points[str(n)]['interval'][0]:.1f}, "
             f"{100 * points[str(n)]['interval'][1]:.1f}]" if str(n) in points else "–" for n in budgets]
    store = finding.get("store_cell_rank1")
    if finding.get("at_floor"):
        flag, store = "at the floor: not rerun", next(iter(points.values()))["rank1"]
    else:
        flag = (BUDGET_FLAG + (", still falling" if finding["still_falling"] else "")) if finding["flag"] else ""
    return (f"| {model_id} | {finding['attack']} | " + " | ".join(cells)
            + f" | {'–' if store is None else f'{100 * store:.1f}'} | {flag} | "
            + ("kept (current finding; --force reruns)" if finding.get("kept") else f"{finding.get('seconds', '–')}") + " |")
