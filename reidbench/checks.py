"""Every reliability check on result cells, in one home (in the spirit of AutoAttack's checks
module): what a worst case may combine, the worst case itself with its intervals, and the
checks that need several cells of one model. The leaderboard, the Python API and the
benchmark scripts read their verdicts from here; per-cell checks that need the attack's
internals (the sanity flags a record carries) stay with the runner.

A worst case combines only cells that agree on the weights' sha256, the split hash and the
protocol fingerprint (the largest such group of the model; none when two groups tie); the
others are stale, named by :func:`stale_note` and left out.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .errors import ReIDBenchError
from .metrics import IdentityBootstrap, identity_spread
from .protocol import CURRENT_VERSION, load_protocol
from .results import outcomes_or_none

# What a worst case must not mix (columns of the cells frame, reidbench.leaderboard.records).
CONSISTENCY = ("weights_sha256", "split_hash", "protocol_fingerprint")


@lru_cache(maxsize=None)
def interval_settings(version: str) -> dict:
    """Bootstrap settings (resamples, level, seed) of a protocol version; a version this
    package does not ship gets the current one's."""
    try:
        protocol = load_protocol(version)
    except ReIDBenchError:
        protocol = load_protocol(CURRENT_VERSION)
    return {**protocol.interval, "seed": protocol.seed}


def consistent_cells(cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, stale): the largest group of ``cells`` agreeing on the weights' sha256, the split
    hash and the protocol fingerprint, and the rest. When two groups are equally large there
    is no telling which is current: nothing is kept."""
    if cells.empty:
        return cells, cells.iloc[0:0]
    keys = list(zip(*(cells[c].fillna("").astype(str) for c in CONSISTENCY)))
    counts = Counter(keys).most_common()
    if len(counts) == 1:
        return cells, cells.iloc[0:0]
    if counts[0][1] == counts[1][1]:
        return cells.iloc[0:0], cells
    keep = np.array([k == counts[0][0] for k in keys])
    return cells[keep], cells[~keep]


def stale_note(attacks) -> Optional[str]:
    """The flag that lists the cells a worst case left out."""
    if not len(attacks):
        return None
    return "stale cells, left out of the worst case (other weights, split or protocol): " + " ".join(sorted(set(attacks)))


def worst_case(cells: pd.DataFrame, perturbed: str = "query") -> dict:
    """Per query, the worst outcome over the given measured cells of one model that perturb
    the same side (the query by default): robust Rank-1 = share of queries whose first match
    stays on top under every attack, robust mAP = mean over queries of the lowest AP any
    attack reached, and the per-identity Rank-1 variance of that worst case; each with its
    95% interval (``*_ci``, the identity bootstrap of the record's protocol).

    Only consistent cells are combined (:func:`consistent_cells`); ``stale`` lists the attack
    ids left out, and when no group is the largest the worst case is refused (None)."""
    if "standardized" in cells:
        cells = cells[cells["standardized"].astype(bool)]
    cells = cells[cells["perturbed"] == perturbed]
    cells, stale = consistent_cells(cells) if all(c in cells for c in CONSISTENCY) else (cells, cells.iloc[0:0])
    empty = {"rank1": None, "mAP": None, "identity_var": None, "rank1_ci": None, "mAP_ci": None,
             "identity_var_ci": None, "attacks": len(cells), "stale": sorted(set(stale["attack"])) if len(stale) else []}
    if cells.empty:
        return empty
    outcomes = [outcomes_or_none(p) for p in cells["path"]]
    if any(o is None for o in outcomes):
        return empty  # a cell without per-query outcomes
    n = {len(o["attacked_ap"]) for o in outcomes}
    if len(n) != 1:
        return empty
    valid = outcomes[0]["clean_first_hit"] >= 0
    ap = np.min([o["attacked_ap"] for o in outcomes], axis=0)[valid]
    hit = np.all([o["attacked_first_hit"] == 0 for o in outcomes], axis=0)[valid]
    out = {**empty, "rank1": float(hit.mean()) if hit.size else None,
           "mAP": float(np.nanmean(ap)) if ap.size else None}
    if "query_pids" in outcomes[0]:
        pids = outcomes[0]["query_pids"].astype(np.int64)
        worst_first_hit = np.where(valid, np.max([o["attacked_first_hit"] for o in outcomes], axis=0), -1)
        versions = set(cells["protocol_version"]) if "protocol_version" in cells else set()
        settings = interval_settings(versions.pop() if len(versions) == 1 else CURRENT_VERSION)
        spread = identity_spread(torch.from_numpy(worst_first_hit.astype(np.int64)), torch.from_numpy(pids), **settings)
        out["identity_var"], out["identity_var_ci"] = spread["rank1_var"], spread["rank1_var_ci95"]
        finite = np.isfinite(ap)
        if hit.size:
            out["rank1_ci"] = IdentityBootstrap(pids[valid], **settings).mean_interval(hit.astype(np.float64))
        if finite.any():
            out["mAP_ci"] = IdentityBootstrap(pids[valid][finite], **settings).mean_interval(ap[finite])
    return out


def cross_cell_flags(cells: pd.DataFrame) -> list[str]:
    """Flags that need several cells of one model: a black-box attack beating every white-box
    one, on Rank-1 or on mAP, smells of gradient masking (Athalye et al. 2018; Croce & Hein
    2020). Only consistent cells are compared."""
    if all(c in cells for c in CONSISTENCY):
        cells = consistent_cells(cells)[0]
    beaten = []
    for metric, label in (("rank1", "Rank-1"), ("mAP", "mAP")):
        white = cells[cells["threat_model"] == "white-box"][metric].dropna()
        black = cells[cells["threat_model"].isin(["transfer", "query-based"])][metric].dropna()
        if len(white) and len(black) and black.min() < white.min() - 0.01:
            beaten.append(label)
    return [f"black-box-beats-white-box ({', '.join(beaten)})"] if beaten else []
