"""Checks on a submitted zoo entry: its weights, its records, and a sample of its numbers, recomputed.

A submission is a zoo entry with pinned weights plus the result folder
``<results>/<protocol>/<dataset>/<entry>/`` that ``reidbench run`` wrote for it. It is
rejected, with one line per reason, when

* its weights are not pinned (``weights: {path|repo..., sha256}``, or ``from:`` an entry that
  is), cannot be had, or do not match the pinned sha256;
* a record is missing (the ``m-ifgsm`` cell at the protocol's ε and its per-query ``.npz``),
  was computed with other weights, on another split or under another protocol;
* a record's attack parameters are not the protocol's; in particular a white-box record of a
  stochastic defense whose attack was not averaged over the protocol's EOT draws
  (``attack.eot_samples`` below ``adaptive.eot_samples``);
* a record's summary numbers are not what its own per-query file gives;
* a defended entry has no budget sweep (``reidbench sweep``) on its pinned weights
  under the protocol: it is not recomputed, only required, so the leaderboard can flag it;
* clean and ``m-ifgsm`` Rank-1 and mAP, recomputed here on a fixed, committed subset of the
  queries, differ from the same numbers taken from the submitted per-query file by more than
  the tolerance: ``DEFAULT_TOLERANCE`` = 3 points (absolute, in percentage points of Rank-1
  and of mAP).

Why a subset suffices and is comparable: a query's plain ranking depends only on that query
and the (clean) gallery, and ``m-ifgsm`` perturbs each query towards its own guides, so the
per-query outcomes of the subset are those of the full run. The clean features are those of
the whole split, and the subset's queries are attacked in the batches of the record's batch
size with the seeds they had in the full run, so even a stochastic defense's draws are the
submitted ones: on the same machine type the numbers reproduce exactly. The tolerance is for
float differences between machines (a GPU submission checked on a CPU), which can flip a query
whose ranking is a near tie: three points are one or two of the 64 queries (one query is 1.6
points of Rank-1). Re-ranked numbers mix queries and are not compared.

Cost on the synthetic default (ResNet-18, 64x32, 64 queries, one CPU core): about 11 s of CPU
for an undefended model; about 85 s for a stochastic defense, whose attack averages 10 EOT draws.

The subset (``protocols/validation_<version>.json``), per split hash: the first
``SUBSET_SIZE`` valid queries (with a cross-camera true match in the gallery, as the metric
defines it) in the order of ``numpy.random.default_rng(SUBSET_SEED).permutation(num_query)``,
stored sorted. A maintainer adds a dataset with
``python -m reidbench.validate '{"name": "synthetic", "preset": "small"}'``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import ReIDBenchError
from .protocol import Protocol, load_protocol
from .cache import CorruptArtefact
from .record import CellRecord
from .results import budget_sweep_path, cell_path, read_budget_sweep, read_cell, read_per_query, sweep_is_current

DEFAULT_TOLERANCE = 3.0
VALIDATION_ATTACK = "m-ifgsm"
SUBSET_SIZE = 64
SUBSET_SEED = 0
_SUBSET_RULE = ("first n valid queries (a cross-camera true match in the gallery) in the order of "
                "numpy.random.default_rng(seed).permutation(num_query), sorted")
# A record's summary and its per-query file are written together from the same arrays;
# the AP values are stored as float32, hence not an exact equality.
_SUMMARY_SLACK = 1e-4


@dataclass
class Comparison:
    metric: str
    submitted: float  # percentage points
    recomputed: float

    @property
    def difference(self) -> float:
        return abs(self.submitted - self.recomputed)


@dataclass
class Verdict:
    entry_id: str
    tolerance: float
    reasons: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return not self.reasons


# --- the committed query subset ----------------------------------------------------------------
def subset_file(version: str) -> Path:
    return Path(str(resources.files("reidbench.protocols").joinpath(f"validation_{version}.json")))


def choose_subset(split, n: int = SUBSET_SIZE, seed: int = SUBSET_SEED) -> list[int]:
    """The rule behind the committed file (see the module docstring)."""
    import torch

    from .metrics import evaluate_rank

    q, g = split.query, split.gallery
    # Validity is the metric's own: a zero distance matrix ranks nothing but marks the queries it skips.
    valid = evaluate_rank(torch.zeros(len(q), len(g)), q.pids, g.pids, q.camids, g.camids).valid_query.numpy()
    order = np.random.default_rng(seed).permutation(len(q))
    return sorted(int(i) for i in order[valid[order]][:n])


def committed_subset(split, version: str) -> list[int]:
    path = subset_file(version)
    splits = json.loads(path.read_text())["splits"] if path.is_file() else {}
    if split.split_hash not in splits:
        raise ReIDBenchError(
            f"no committed validation subset for dataset '{split.name}' (split {split.split_hash}) in {path.name}; "
            "a maintainer adds it with `python -m reidbench.validate DATASET_JSON`")
    return splits[split.split_hash]["queries"]


def add_subset(dataset: dict, version: str) -> Path:
    """Write the subset of ``dataset``'s split into the committed file (a maintainer's step)."""
    from .data import build_dataset

    split = build_dataset(dataset["name"], **{k: v for k, v in dataset.items() if k != "name"})
    path = subset_file(version)
    content = json.loads(path.read_text()) if path.is_file() else {
        "protocol": version, "rule": _SUBSET_RULE, "n": SUBSET_SIZE, "seed": SUBSET_SEED, "splits": {}}
    content["splits"][split.split_hash] = {"dataset": dataset, "num_query": len(split.query),
                                           "queries": choose_subset(split, content["n"], content["seed"])}
    text = json.dumps(content, indent=1, sort_keys=True)
    # One line per query list, so that a diff of the file shows which split changed.
    text = re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    path.write_text(text + "\n")
    return path


# --- numbers from a submission's per-query file ------------------------------------------------
def summary_from_per_query(per_query: dict, label: str, index: Optional[list[int]] = None) -> dict:
    """Rank-1 and mAP (fractions) over the valid queries among ``index`` (all by default)."""
    first_hit, ap = per_query[f"{label}_first_hit"], per_query[f"{label}_ap"]
    if index is not None:
        first_hit, ap = first_hit[index], ap[index]
    valid = first_hit >= 0
    if not valid.any():
        return {"rank1": math.nan, "mAP": math.nan}
    return {"rank1": float((first_hit[valid] == 0).mean()), "mAP": float(ap[valid].astype(np.float64).mean())}


def _record_reasons(path: Path, record: CellRecord, bundle, runner, pinned: str) -> list[str]:
    """What is wrong with one record of the submission, without recomputing it."""
    name, reasons = path.relative_to(path.parents[3]).as_posix(), []
    if record.model.weights_sha256 != pinned:
        reasons.append(f"{name}: computed with weights {str(record.model.weights_sha256)[:12]}…, "
                       f"but the zoo pins {pinned[:12]}…")
    if record.dataset.split_hash != bundle.split.split_hash:
        reasons.append(f"{name}: computed on split {record.dataset.split_hash}, "
                       f"not this dataset's split {bundle.split.split_hash}")
    if (record.protocol and record.protocol.fingerprint) != runner.protocol.fingerprint():
        reasons.append(f"{name}: computed under another protocol than {runner.protocol.version} as shipped")
    subset = record.dataset.query_subset
    if subset:
        reasons.append(f"{name}: computed on a subset of {subset.get('queries')} queries (--queries); submit full runs")
    if bool(record.model.stochastic) != bundle.model.stochastic:
        reasons.append(f"{name}: says stochastic={record.model.stochastic}, but the defense is "
                       f"{'' if bundle.model.stochastic else 'not '}stochastic")
    reasons += _attack_reasons(name, record, bundle, runner)
    if record.per_query is not None:
        npz = path.with_suffix(".npz")
        if not npz.is_file():
            reasons.append(f"{name}: missing file {npz.name} (per-query outcomes)")
            return reasons
        try:
            per_query = read_per_query(path, record)
        except CorruptArtefact as exc:
            reasons.append(f"{name}: {exc}")
            return reasons
        for label in ("clean", "attacked"):
            if f"{label}_first_hit" not in per_query or record.metrics(label) is None:
                reasons.append(f"{name}: no {label} outcomes in the record or in {npz.name}")
                continue
            derived = summary_from_per_query(per_query, label)
            for metric in ("rank1", "mAP"):
                claimed = getattr(record.metrics(label), metric)
                if claimed is None or not abs(float(claimed) - derived[metric]) <= _SUMMARY_SLACK:
                    reasons.append(f"{name}: {label} {metric} {claimed} is not what {npz.name} gives "
                                   f"({derived[metric]:.6f})")
    return reasons


def _attack_reasons(name: str, record: CellRecord, bundle, runner) -> list[str]:
    submitted = record.attack
    try:
        if record.perturbation is None:
            raise KeyError("perturbation")
        expected = runner.make_attack(submitted.get("name", ""), float(record.perturbation.eps), bundle).describe()
    except (ReIDBenchError, KeyError, TypeError, ValueError) as exc:
        return [f"{name}: cannot rebuild its attack ({exc})"]
    if "surrogate" in expected and expected["surrogate"] is None:
        # A transfer attack records the surrogate the run handed it, which must be the one the
        # protocol fixes for the dataset (the rebuilt attack has not been handed one yet).
        fixed = runner.protocol.surrogate(bundle.split.name) if runner.protocol.has_surrogate(bundle.split.name) else None
        if submitted.get("surrogate") != fixed:
            return [f"{name}: transferred from surrogate {submitted.get('surrogate')!r}, but protocol "
                    f"{runner.protocol.version} fixes {fixed!r} for dataset '{bundle.split.name}'"]
        expected["surrogate"] = fixed
    if "eot_samples" in expected and int(submitted.get("eot_samples", 1)) < expected["eot_samples"]:
        return [f"{name}: stochastic defense attacked without EOT (eot_samples {submitted.get('eot_samples', 1)}, "
                f"protocol {runner.protocol.version} needs {expected['eot_samples']})"]
    differing = sorted(k for k in set(expected) | set(submitted) if expected.get(k) != submitted.get(k))
    if differing:
        return [f"{name}: attack parameters differ from the protocol's: "
                + ", ".join(f"{k}={submitted.get(k)!r} (expected {expected.get(k)!r})" for k in differing)]
    return []


def _sweep_reasons(entry_id: str, results_root: Path, protocol: Protocol, pinned: str) -> list[str]:
    """A defended entry's budget sweep must be there, on the pinned weights, under this protocol.
    It is not recomputed (500 iterations per query are the submitter's cost, not CI's); its
    presence puts the flag, or its absence, on the leaderboard."""
    path = budget_sweep_path(results_root, protocol.version)
    finding = read_budget_sweep(results_root, protocol.version).get(entry_id)
    rerun = f"reidbench sweep {entry_id} --results {results_root}"
    if not isinstance(finding, dict):
        return [f"no budget sweep of the defended entry '{entry_id}' in {path} (run: {rerun})"]
    if not sweep_is_current(finding, {pinned}, {protocol.fingerprint()}):
        return [f"{path}: the budget sweep of '{entry_id}' was measured on weights "
                f"{str(finding.get('weights_sha256'))[:12]}… under protocol fingerprint "
                f"{finding.get('protocol_fingerprint')}, not on the pinned {pinned[:12]}… under "
                f"{protocol.fingerprint()} (run again: {rerun})"]
    return []


# --- the whole check ---------------------------------------------------------------------------
def validate_entry(entry_id: str, zoo: dict, results_root: Path, tolerance: float = DEFAULT_TOLERANCE,
                   device: str = "auto", protocol: Optional[Protocol] = None) -> Verdict:
    from .data.split import ReIDSplit
    from .runner import ModelBundle, Runner, attack_id
    from .zoo.schema import get_entry, training_entry
    from .zoo.weights import existing_weights

    entry = get_entry(zoo, entry_id)
    verdict = Verdict(entry.id, tolerance)
    trainer = training_entry(entry, zoo)
    pinned = trainer.weights.get("sha256", "").lower()
    if not pinned or not ({"path", "repo"} & set(trainer.weights)):
        verdict.reasons.append(f"weights of '{trainer.id}' are not pinned: a submission needs "
                               "weights: {path: ..., sha256: ...} or {repo, file, revision, sha256}")
        return verdict
    try:
        existing_weights(trainer)
    except ReIDBenchError as exc:  # unreachable, or a sha256 mismatch
        verdict.reasons.append(str(exc))
        return verdict

    runner = Runner(zoo, results_root=results_root, protocol=protocol or load_protocol(), device=device,
                    train_missing=False, rerank=False, progress=False)
    protocol = runner.protocol
    try:
        bundle = runner.bundle(entry)
    except ReIDBenchError as exc:  # e.g. weights that do not fit the entry's model
        verdict.reasons.append(str(exc))
        return verdict
    folder = cell_path(results_root, protocol.version, bundle.split.name, entry.id, "x").parent
    cell = folder / f"{attack_id(VALIDATION_ATTACK, protocol.eps)}.json"
    records = {path: read_cell(path) for path in sorted(folder.glob("*.json"))}
    for path, record in records.items():
        if record is None:
            verdict.reasons.append(f"{path}: not a valid result record")
        else:
            verdict.reasons += _record_reasons(path, record, bundle, runner, pinned)
    if entry.defended:
        verdict.reasons += _sweep_reasons(entry.id, results_root, protocol, pinned)
    if records.get(cell) is None or not cell.with_suffix(".npz").is_file():
        missing = cell if records.get(cell) is None else cell.with_suffix(".npz")
        verdict.reasons.append(f"missing file {missing} (validation recomputes {VALIDATION_ATTACK} at the protocol's ε)")
        return verdict
    if records[cell].dataset.split_hash != bundle.split.split_hash:
        return verdict  # already a reason; the per-query files index another split
    try:
        index = committed_subset(bundle.split, protocol.version)
    except ReIDBenchError as exc:
        verdict.reasons.append(str(exc))
        return verdict

    # Clean features of the whole split and the attack on the subset's queries in their own
    # batches, as the run computed them: a stochastic transform then draws the same numbers.
    runner.batch_size = int(records[cell].batch_size if records[cell].batch_size is not None else runner.batch_size)
    feats = runner.clean_features(bundle)
    adv_feats, *_ = runner.attack_images(bundle, runner.make_attack(VALIDATION_ATTACK, protocol.eps, bundle), only=index)
    split = bundle.split
    sub = ModelBundle(entry, bundle.model, ReIDSplit(split.name, split.train, split.query.select(index), split.gallery,
                                                     split.image_size, split.split_hash, split.info), bundle.weights_sha256)
    recomputed, _ = runner.score(sub, {"query": feats["query"][index], "gallery": feats["gallery"]}, adv_feats,
                                 feats["gallery"])
    try:
        submitted = read_per_query(cell)
    except CorruptArtefact:
        return verdict  # already a reason of the record's
    for label, title in (("clean", "clean"), ("attacked", VALIDATION_ATTACK)):
        claimed = summary_from_per_query(submitted, label, index)
        for metric, metric_title in (("rank1", "Rank-1"), ("mAP", "mAP")):
            row = Comparison(f"{title} {metric_title}", 100 * claimed[metric], 100 * recomputed[label][metric])
            verdict.comparisons.append(row)
            if not row.difference <= tolerance:  # NaN fails too
                verdict.reasons.append(
                    f"{row.metric} on the {len(index)} validation queries does not reproduce: submitted "
                    f"{row.submitted:.2f}, recomputed {row.recomputed:.2f} (tolerance {tolerance:g} points)")
    return verdict


# --- which entries a pull request submits ------------------------------------------------------
def changed_entries(base: dict, head: dict) -> list[str]:
    """Ids of ``head``'s entries (zoo order) that are new or differ from ``base``'s, and of the
    entries borrowing their weights (``weights.from``): their numbers change with them."""
    changed = {entry_id for entry_id, entry in head.items() if base.get(entry_id) != entry}
    changed |= {entry_id for entry_id, entry in head.items() if entry.weights.get("from") in changed}
    return [entry_id for entry_id in head if entry_id in changed]


def _git(*args: str, cwd: Path) -> str:
    import subprocess

    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ReIDBenchError(f"cannot run git {args[0]}: {exc}") from None
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["failed"])[0]
        raise ReIDBenchError(f"git {' '.join(args)}: {first}")
    return out.stdout


def submitted_entries(base_ref: str, zoo_path: Optional[str | Path] = None, results: str | Path = "submissions") -> list[str]:
    """What a branch submits against ``base_ref`` (from their merge base, as a pull request's
    diff): zoo entries that are new or changed (see :func:`changed_entries`), then the entries
    whose files under ``results`` changed (the folder name of a cell is its entry id)."""
    import tempfile

    from .zoo.schema import default_zoo_path, load_zoo

    zoo_path = Path(zoo_path or default_zoo_path()).resolve()
    top = Path(_git("rev-parse", "--show-toplevel", cwd=zoo_path.parent).strip())
    merge_base = _git("merge-base", base_ref, "HEAD", cwd=top).strip()
    relative = zoo_path.relative_to(top).as_posix()
    head = load_zoo(zoo_path)
    try:
        base_text = _git("show", f"{merge_base}:{relative}", cwd=top)
    except ReIDBenchError:  # no zoo file on the base branch: everything is new
        base_text = "[]"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / zoo_path.name).write_text(base_text)
        try:
            base = load_zoo(Path(tmp) / zoo_path.name)
        except ReIDBenchError:  # the base's zoo does not parse under today's schema: check every entry
            base = {}
    ids = changed_entries(base, head)
    results = Path(results)
    results = results if results.is_absolute() else top / results
    # Deleted cells are a withdrawal, not a submission.
    changed_files = _git("diff", "--name-only", "--diff-filter=d", merge_base, "--", str(results), cwd=top).split()
    changed_files += _git("ls-files", "--others", "--exclude-standard", "--", str(results), cwd=top).split()
    for name in changed_files:
        parts = Path(name).parts
        if name.endswith((".json", ".npz")) and len(parts) >= 2 and parts[-2] not in ids:
            ids.append(parts[-2])
    return ids


def print_verdict(verdict: Verdict) -> None:
    from rich.table import Table

    from .progress import console

    if verdict.comparisons:
        table = Table(title=f"{verdict.entry_id}: submitted vs recomputed on the validation queries (points)")
        for column in ("metric", "submitted", "recomputed", "|Δ|", f"≤ {verdict.tolerance:g}"):
            table.add_column(column, justify="right")
        for row in verdict.comparisons:
            ok = row.difference <= verdict.tolerance
            table.add_row(row.metric, f"{row.submitted:.2f}", f"{row.recomputed:.2f}", f"{row.difference:.2f}",
                          "[green]yes[/]" if ok else "[red]no[/]")
        console.print(table)


if __name__ == "__main__":
    import sys

    from .protocol import CURRENT_VERSION

    for spec in sys.argv[1:]:
        print(add_subset(json.loads(spec), CURRENT_VERSION))
