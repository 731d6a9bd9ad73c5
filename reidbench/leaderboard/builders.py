"""What each table of the site shows: per dataset × ε the summary (reported, standardized and
adaptive numbers apart, ranked by worst-case Rank-1) and one table per threat model, and the
table of every cell on a model's page. The reliability verdicts (worst cases, stale cells,
cross-cell flags) come from :mod:`reidbench.checks`.

Three kinds of numbers stay in separate columns, as on RobustBench (Croce et al. 2021):
*reported* -- what a submitter claims (``records``); *standardized* -- measured by our runner
under the protocol's attack grid; *adaptive* -- the per-query worst case over every attack run
on the model, the grid plus variants outside it (``eot``, ``bpda``, ``oblivious``, extra
attacks), shown only for models that have such cells. Per-identity variance (DDID's bias
measure, ``metrics/fairness.py``) is shown clean and under the per-query worst case of the same
attacks as the table's worst-case columns.
"""

from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from ..checks import consistent_cells, cross_cell_flags, stale_note, worst_case
from ..errors import ReIDBenchError
from ..protocol import load_protocol
from ..results import BUDGET_FLAG, sweep_is_current
from .plots import robustness_map
from .records import INTERVAL_SOURCES, is_missing, threat_key, threat_order, to_eps255
from .table import Column, Table, eps_text, page_name, put_value, table_slug

MODEL_COLUMNS = [Column("model", "model", kind="model"), Column("backbone", "backbone"), Column("defense", "defense"),
                 Column("train_dataset", "trained on")]
CLEAN_COLUMNS = [Column("clean.rank1", "R-1", "clean", "pct", ci=True), Column("clean.mAP", "mAP", "clean", "pct", ci=True)]
INTERVAL_NOTE = ("a ± b: the number and half the width of its 95% interval (a bootstrap over test identities; the bounds "
                 "are in the tooltip and the downloads).")
VAR_GROUP = "per-identity R-1 variance (%²)"


def _reported_columns(robust_label: str) -> list[Column]:
    return [Column("reported.clean.rank1", "clean R-1", "reported", "pct"),
            Column("reported.clean.mAP", "clean mAP", "reported", "pct"),
            Column("reported.robust.rank1", f"{robust_label} R-1", "reported", "pct"),
            Column("reported.robust.mAP", f"{robust_label} mAP", "reported", "pct"),
            Column("reported.source", "source", "reported", "source"),
            Column("reported.footnote", "note", "reported")]


def _flags(cells: pd.DataFrame, model_cells: pd.DataFrame, extra: Optional[list] = None) -> str:
    flags = {f.strip() for f in ", ".join(cells["flags"]).split(",") if f.strip()}
    return "; ".join(sorted(flags | set(cross_cell_flags(model_cells)) | {e for e in extra or [] if e}))


def first_value(series: pd.Series):
    values = series.dropna()
    return values.iloc[0] if len(values) else math.nan


def _reported_values(cells: pd.DataFrame) -> dict:
    """The submitter's numbers over some cells: clean as claimed, robust = the lowest claim."""
    claimed = cells[cells["reported_source"].notna()]
    if claimed.empty:
        return {}
    sources = sorted(set(claimed["reported_source"]))
    notes = sorted({n for n in claimed["reported_footnote"] if not is_missing(n)})
    urls = sorted({u for u in claimed["reported_url"] if not is_missing(u)})
    return {"reported.clean.rank1": first_value(claimed["reported_clean_rank1"]),
            "reported.clean.mAP": first_value(claimed["reported_clean_mAP"]),
            "reported.robust.rank1": claimed["reported_rank1"].min(skipna=True),
            "reported.robust.mAP": claimed["reported_mAP"].min(skipna=True),
            "reported.source": "; ".join(sources), "reported.footnote": "; ".join(notes) or None,
            "reported_url": urls[0] if len(urls) == 1 else None}


def _interval(cell, column: str) -> tuple[float, float]:
    """(lo, hi) of a flat column of one cell (a row of the cells frame)."""
    return getattr(cell, f"{column}_lo"), getattr(cell, f"{column}_hi")


def _model_base(model: str, cells: pd.DataFrame) -> dict:
    first = cells.iloc[0]
    measured = cells[cells["standardized"].astype(bool)]
    # Clean numbers from the cells a worst case would use (any measured cell when none would).
    kept = consistent_cells(measured)[0]
    source = next((c for c in (kept if len(kept) else measured).itertuples()), None)
    row = {"model": model, "backbone": first.backbone, "defense": first.defense, "train_dataset": first.train_dataset}
    for key, column in (("clean.rank1", "clean_rank1"), ("clean.mAP", "clean_mAP"), ("var.clean", "clean_var")):
        if source is None:
            put_value(row, key, math.nan)
        else:
            put_value(row, key, getattr(source, column), _interval(source, column))
    return row


def expected_attacks(protocol_version: str, dataset: str, eps255) -> Optional[set[str]]:
    """The attacks the protocol's suite runs on ``dataset`` at ``eps255`` (its grid at the
    primary ε, its secondary attacks at the secondary ε, less the cells it does not define
    there); None for a protocol this package does not know."""
    from ..grid import undefined_cell  # here: the grid pulls in the attack and defense catalogs

    try:
        protocol = load_protocol(protocol_version)
    except ReIDBenchError:
        return None
    names = protocol.secondary_attacks if eps255 is not None and eps255 == to_eps255(protocol.eps_secondary) \
        else protocol.attacks()
    return {name for name in names if not undefined_cell(protocol, name, dataset)}


def _by_worst_map(rows: list[dict], key: str) -> list[dict]:
    """Most robust first (RobustBench's order), then by model id; missing numbers last."""
    def order(row: dict) -> tuple:
        value = row.get(key)
        return (1, 0.0, row["model"]) if is_missing(value) else (0, -float(value), row["model"])

    return sorted(rows, key=order)


def _by_worst_rank1(rows: list[dict]) -> list[dict]:
    """RobustBench's order: models with every expected cell first, by worst-case Rank-1 (most
    robust first), ranked; then the incomplete ones, unranked, by the same number. A worst case
    over fewer attacks is not comparable with one over the whole grid."""
    def order(row: dict) -> tuple:
        value = row.get("standardized.rank1")
        return (not row["complete"], is_missing(value), 0.0 if is_missing(value) else -float(value), row["model"])

    ordered = sorted(rows, key=order)
    for position, row in enumerate(ordered, 1):
        row["rank"] = position if row["complete"] and not is_missing(row.get("standardized.rank1")) else None
    return ordered


def _sweep_flag(finding: Optional[dict], mcells: pd.DataFrame) -> Optional[str]:
    """The budget sweep's word in the summary: the flag when the sweep measured these cells'
    weights under their protocol, a stale note when it measured others (never their flag)."""
    if not isinstance(finding, dict):
        return None
    if not sweep_is_current(finding, set(mcells["weights_sha256"]), set(mcells["protocol_fingerprint"])):
        return "budget sweep stale: other weights or protocol than the cells"
    return BUDGET_FLAG if finding.get("flag") else None


def summary_table(dataset: str, eps255, cells: pd.DataFrame, grid: Optional[set[str]],
                  sweep: Optional[dict] = None, expected: Optional[set[str]] = None) -> Table:
    """The headline of one dataset at one ε: reported, standardized and adaptive numbers.
    ``sweep``: the budget sweep's findings per model (``results.read_budget_sweep``); a model
    whose Rank-1 kept falling with more iterations is flagged ``budget-sensitive``.
    ``expected``: the attacks every model should have here (:func:`expected_attacks`); a model
    that lacks some is marked incomplete and never ranked among the complete ones."""
    rows, any_reported, any_adaptive = [], False, False
    for model, mcells in cells.groupby("model", sort=True):
        in_grid = mcells["attack_name"].isin(grid) if grid is not None else pd.Series(True, index=mcells.index)
        standard = worst_case(mcells[in_grid])
        row = {**_model_base(model, mcells), **_reported_values(mcells), "standardized.attacks": standard["attacks"]}
        have = set(mcells.loc[mcells["standardized"].astype(bool) & (mcells["perturbed"] == "query"), "attack_name"])
        missing = sorted((expected or set()) - have)
        row["complete"] = not missing
        incomplete = f"incomplete ({len(expected) - len(missing)} of {len(expected)} attacks)" if missing else None
        put_value(row, "standardized.rank1", standard["rank1"], standard["rank1_ci"])
        put_value(row, "standardized.mAP", standard["mAP"], standard["mAP_ci"])
        put_value(row, "var.worst", standard["identity_var"], standard["identity_var_ci"])
        stale = list(standard["stale"])
        beyond = mcells[~in_grid & mcells["standardized"].astype(bool) & (mcells["perturbed"] == "query")]
        if not beyond.empty:
            adaptive = worst_case(mcells)
            put_value(row, "adaptive.rank1", adaptive["rank1"], adaptive["rank1_ci"])
            put_value(row, "adaptive.mAP", adaptive["mAP"], adaptive["mAP_ci"])
            row["adaptive.attacks"] = adaptive["attacks"]
            stale += adaptive["stale"]
            any_adaptive = True
        row["flags"] = _flags(mcells, mcells[mcells["standardized"].astype(bool)],
                              [incomplete, stale_note(stale), _sweep_flag((sweep or {}).get(model), mcells)])
        any_reported |= "reported.source" in row
        rows.append(row)
    columns = [Column("rank", "#", kind="int")] + MODEL_COLUMNS
    if any_reported:
        columns += _reported_columns("robust")
    columns += [Column("clean.rank1", "clean R-1", "standardized", "pct", ci=True),
                Column("clean.mAP", "clean mAP", "standardized", "pct", ci=True),
                Column("standardized.rank1", "worst R-1", "standardized", "pct", ci=True),
                Column("standardized.mAP", "worst mAP", "standardized", "pct", ci=True),
                Column("standardized.attacks", "attacks", "standardized", "int")]
    if any_adaptive:
        columns += [Column("adaptive.rank1", "worst R-1", "adaptive", "pct", ci=True),
                    Column("adaptive.mAP", "worst mAP", "adaptive", "pct", ci=True),
                    Column("adaptive.attacks", "attacks", "adaptive", "int")]
    columns += [Column("var.clean", "clean", VAR_GROUP, "var", ci=True), Column("var.worst", "worst", VAR_GROUP, "var", ci=True),
                Column("flags", "sanity flags")]
    note = ("Sorted by worst-case Rank-1; # ranks the models that have every cell the protocol runs here, the others "
            "follow unranked, flagged incomplete. "
            "Standardized: measured by the protocol runner; worst = per query, the worst outcome over every attack of the "
            "protocol grid that perturbs the query. Adaptive: the same over every attack run on the model (grid and "
            "variants), where variants were run. A worst case combines only cells with the same weights, split and "
            "protocol; stale cells are named in the flags. Reported: the submitter's claim (robust = the lowest "
            "claimed). Per-identity variance: clean, and under the standardized worst case. Re-ranked numbers are not "
            "here: under attack they are non-adaptive (see the model pages). " + INTERVAL_NOTE)
    return Table(table_slug(dataset, eps255, "summary"), f"{dataset}, {eps_text(eps255)}: summary", note, columns,
                 _by_worst_rank1(rows))


def threat_table(dataset: str, eps255, threat: str, cells: pd.DataFrame, all_cells: pd.DataFrame) -> Table:
    """One dataset × ε × threat model (cells that perturb one side): each attack's numbers
    and their per-query worst case."""
    perturbed = cells["perturbed"].iloc[0]
    attacks = sorted(cells["attack"].unique())
    rows = []
    for model, mcells in cells.groupby("model", sort=True):
        by_attack = {r.attack: r for r in mcells[mcells["standardized"].astype(bool)].itertuples()}
        worst = worst_case(mcells, perturbed)
        row = {**_model_base(model, all_cells[all_cells["model"] == model]), **_reported_values(mcells),
               "flags": _flags(mcells, all_cells[(all_cells["model"] == model) & all_cells["standardized"].astype(bool)],
                               [stale_note(worst["stale"])])}
        put_value(row, "worst.rank1", worst["rank1"], worst["rank1_ci"])
        put_value(row, "worst.mAP", worst["mAP"], worst["mAP_ci"])
        put_value(row, "var.worst", worst["identity_var"], worst["identity_var_ci"])
        for attack in attacks:
            if attack in by_attack:
                cell = by_attack[attack]
                put_value(row, f"{attack}.rank1", cell.rank1, _interval(cell, "rank1"))
                put_value(row, f"{attack}.mAP", cell.mAP, _interval(cell, "mAP"))
        rows.append(row)
    columns = MODEL_COLUMNS + CLEAN_COLUMNS
    for attack in attacks:
        columns += [Column(f"{attack}.rank1", "R-1", attack, "pct", ci=True), Column(f"{attack}.mAP", "mAP", attack, "pct", ci=True)]
    columns += [Column("worst.rank1", "R-1", "worst case", "pct", ci=True), Column("worst.mAP", "mAP", "worst case", "pct", ci=True),
                Column("var.clean", "clean", VAR_GROUP, "var", ci=True), Column("var.worst", "worst", VAR_GROUP, "var", ci=True)]
    if any("reported.source" in r for r in rows):
        columns += _reported_columns("lowest")
    columns.append(Column("flags", "sanity flags"))
    note = ("Rank-1 / mAP in %, standardized (measured by the protocol runner). Worst case: per query, over the "
            "attacks of this table whose cells share the weights, split and protocol (stale cells are named in the "
            "flags). Per-identity variance: clean, and under that worst case. " + INTERVAL_NOTE)
    return Table(table_slug(dataset, eps255, threat), f"{dataset}, {eps_text(eps255)}: {threat}", note, columns,
                 _by_worst_map(rows, "worst.mAP"))


def index_sections(cells: pd.DataFrame, grid: Optional[set[str]] = None, sweep: Optional[dict] = None,
                   protocol_version: Optional[str] = None) -> list[dict]:
    """Per dataset and ε: the clean-against-worst picture, the summary table, then one table
    per threat model present."""
    sections = []
    if cells.empty:
        return sections
    cells = cells.assign(eps255=[to_eps255(e) for e in cells["eps"]],
                         threat=[threat_key(t, p) for t, p in zip(cells["threat_model"], cells["perturbed"])])
    for dataset, dcells in cells.groupby("dataset", sort=True):
        for eps255 in sorted(set(dcells["eps255"]), key=lambda e: (e is None, e or 0)):
            ecells = dcells[dcells["eps255"].isna()] if eps255 is None else dcells[dcells["eps255"] == eps255]
            expected = expected_attacks(protocol_version, dataset, eps255) if protocol_version else None
            summary = summary_table(dataset, eps255, ecells, grid, sweep, expected)
            tables = [summary]
            for threat in sorted(ecells["threat"].unique(), key=threat_order):
                tables.append(threat_table(dataset, eps255, threat, ecells[ecells["threat"] == threat], ecells))
            sections.append({"dataset": dataset, "eps": eps_text(eps255), "tables": tables,
                             "picture": robustness_map(summary.rows, f"{dataset}, {eps_text(eps255)}"),
                             "split_hashes": sorted(h for h in ecells["split_hash"].unique() if h)})
    return sections


# --- a model page's table ----------------------------------------------------------------
RERANKED_ATTACKED = "attacked, re-ranked: non-adaptive"
MODEL_TABLE_COLUMNS = [
    Column("dataset", "dataset"), Column("attack", "attack"), Column("threat_model", "threat model"),
    Column("eps255", "ε (/255)", kind="eps"), Column("perturbed", "perturbed"),
    Column("clean.rank1", "R-1", "clean", "pct", ci=True), Column("clean.mAP", "mAP", "clean", "pct", ci=True),
    Column("attacked.rank1", "R-1", "attacked", "pct", ci=True), Column("attacked.rank5", "R-5", "attacked", "pct"),
    Column("attacked.rank10", "R-10", "attacked", "pct"), Column("attacked.mAP", "mAP", "attacked", "pct", ci=True),
    Column("attacked.mINP", "mINP", "attacked", "pct", ci=True),
    Column("clean_reranked.rank1", "R-1", "clean, re-ranked", "pct", ci=True),
    Column("clean_reranked.mAP", "mAP", "clean, re-ranked", "pct", ci=True),
    Column("attacked_reranked.rank1", "R-1", RERANKED_ATTACKED, "pct", ci=True),
    Column("attacked_reranked.mAP", "mAP", RERANKED_ATTACKED, "pct", ci=True),
    Column("var.attacked", "attacked", VAR_GROUP, "var", ci=True),
    Column("linf255", "L∞ used (/255)", kind="float"), Column("wall_time_s", "wall time (s)", kind="float"),
    Column("flags", "sanity flags"),
]
_MODEL_TABLE_SOURCE = {"clean.rank1": "clean_rank1", "clean.mAP": "clean_mAP", "attacked.rank1": "rank1",
                       "attacked.rank5": "rank5", "attacked.rank10": "rank10", "attacked.mAP": "mAP", "attacked.mINP": "mINP",
                       "clean_reranked.rank1": "rr_clean_rank1", "clean_reranked.mAP": "rr_clean_mAP",
                       "attacked_reranked.rank1": "rr_rank1", "attacked_reranked.mAP": "rr_mAP", "var.attacked": "var"}


def model_table(model: str, cells: pd.DataFrame) -> Table:
    rows = []
    order = sorted(cells.index, key=lambda i: (cells.at[i, "dataset"], threat_order(
        threat_key(cells.at[i, "threat_model"], cells.at[i, "perturbed"])), cells.at[i, "attack"]))
    stale = set()
    for _, dcells in cells[cells["standardized"].astype(bool)].groupby("dataset"):
        stale |= set(consistent_cells(dcells)[1].index)
    for i in order:
        r = cells.loc[i]
        flags = [f for f in (r["flags"], "stale: other weights, split or protocol than the model's other cells"
                             if i in stale else "") if f]
        row = {"dataset": r["dataset"], "attack": r["attack"], "threat_model": r["threat_model"], "eps255": to_eps255(r["eps"]),
               "perturbed": r["perturbed"], "linf255": None if is_missing(r["linf"]) else r["linf"] * 255,
               "wall_time_s": r["wall_time_s"], "flags": "; ".join(flags), **_reported_values(cells.loc[[i]])}
        for key, source in _MODEL_TABLE_SOURCE.items():
            if source in INTERVAL_SOURCES:
                put_value(row, key, r[source], (r[f"{source}_lo"], r[f"{source}_hi"]))
            else:
                row[key] = r[source]
        rows.append(row)
    columns = list(MODEL_TABLE_COLUMNS)
    if cells["reported_source"].notna().any():
        columns[-1:-1] = _reported_columns("attacked")
    return Table(page_name(model), f"{model}: every cell", "Rank-1 / mAP / mINP in %, plain and with k-reciprocal "
                 "re-ranking; per-identity variance of the attacked Rank-1. Re-ranked numbers under attack are "
                 "non-adaptive: the attacks optimise plain distances, not re-ranked ones, so these overstate robustness "
                 "and never enter a worst case. " + INTERVAL_NOTE, columns, rows)
