"""Readable reference implementations of the evaluation, beside the fast paths of
:mod:`.rank` and :mod:`.rerank`: one query (one row) at a time, in NumPy, written to be
checked by eye against the protocol's definitions rather than to be fast. The tests hold the
fast paths to them on random and hand-made cases; the benchmarks time the fast paths against
them. Nothing in a run calls them.
"""

from __future__ import annotations

import numpy as np


def reference_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, ap: str = "noninterp",
                   ties: str = "pessimistic") -> dict:
    """The Market-1501 evaluation (Zheng et al., ICCV 2015), query by query.

    Per query: rank the gallery by distance (``ties="pessimistic"``: a positive tied with a
    negative ranks after it; ``"index"``: ties keep gallery order), drop junk (pid -1) and the
    query identity's images from its own camera, and read the metrics off the remaining match
    vector. ``ap="noninterp"`` is the mean of the precisions at each hit (torchreid,
    fast-reid); ``"trapezoid"`` is the official MATLAB code's trapezoidal AP. A query without
    a valid match gets NaN AP / INP and first hit -1 and is left out of every mean.

    Returns ``cmc`` (max_rank,), ``mAP``, ``mINP``, and per query ``per_query_ap``,
    ``per_query_inp``, ``first_hit``, ``valid``.
    """
    distmat = np.asarray(distmat, dtype=np.float64)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    per_ap, per_inp, first_hits = [], [], []
    for q in range(distmat.shape[0]):
        positive = g_pids == q_pids[q]
        if ties == "pessimistic":
            order = np.lexsort((positive, distmat[q]))  # by distance, then negatives (False) first
        else:
            order = np.argsort(distmat[q], kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        keep = (pids != -1) & ~((pids == q_pids[q]) & (cams == q_camids[q]))
        hits = np.flatnonzero(pids[keep] == q_pids[q])
        if hits.size == 0:
            per_ap.append(np.nan)
            per_inp.append(np.nan)
            first_hits.append(-1)
            continue
        n = hits.size
        i = np.arange(1, n + 1)
        if ap == "noninterp":
            value = float(np.mean(i / (hits + 1)))
        else:  # trapezoid between the precision before and at each hit
            before = np.where(hits > 0, (i - 1) / np.maximum(hits, 1), 1.0)
            value = float(np.sum((before + i / (hits + 1)) / 2 / n))
        per_ap.append(value)
        per_inp.append(n / (hits[-1] + 1))
        first_hits.append(int(hits[0]))
    first_hits = np.array(first_hits)
    valid = first_hits >= 0
    n_valid = max(int(valid.sum()), 1)
    cmc = np.array([(first_hits[valid] <= r).sum() / n_valid for r in range(max_rank)])
    return {"cmc": cmc, "mAP": np.nansum(per_ap) / n_valid, "mINP": np.nansum(per_inp) / n_valid,
            "per_query_ap": np.array(per_ap), "per_query_inp": np.array(per_inp), "first_hit": first_hits,
            "valid": valid}


def reference_rerank(q_g, q_q, g_g, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017), row by row, with the data layout
    of the authors' published Python code: squared distances of the stacked (Q+G)² matrix
    divided by each column's maximum and transposed; a full stable ranking of every row;
    k-reciprocal sets from k1 + 1 neighbours, each expanded by the round(k1/2) sets of its
    members that overlap it by more than 2/3; exp(-d) weights summing to 1; query expansion
    over the k2 nearest rows; Jaccard distance 1 - m / (2 - m), m the sum of element-wise
    minima (accumulated through an inverted index, as the authors do); the result mixes
    Jaccard and original distance by ``lambda_value``. Returns (Q, G) float32."""
    q_g, q_q, g_g = (np.asarray(m) for m in (q_g, q_q, g_g))
    Q = q_g.shape[0]
    N = Q + q_g.shape[1]
    stacked = np.block([[q_q, q_g], [q_g.T, g_g]])
    squared = np.square(stacked).astype(np.float32)
    dist = np.transpose(squared / squared.max(axis=0))  # row i is column i, normalized by its max
    ranking = np.argsort(dist, axis=1, kind="stable")
    half = int(np.around(k1 / 2))  # NumPy rounds half to even

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = ranking[i, : k + 1]
        return forward[(ranking[forward, : k + 1] == i).any(axis=1)]

    V = np.zeros((N, N), dtype=np.float32)
    for i in range(N):
        near = reciprocal(i, k1)
        members = [near]
        for c in near:
            candidate = reciprocal(c, half)
            if len(np.intersect1d(candidate, near)) > 2 / 3 * len(candidate):
                members.append(candidate)
        cols = np.unique(np.concatenate(members))
        if cols.size == 0:  # possible when a row is not its own nearest neighbour
            continue
        weights = np.exp(-dist[i, cols])
        V[i, cols] = weights / weights.sum()
    if k2 != 1:
        V = np.stack([V[ranking[i, :k2]].mean(axis=0) for i in range(N)]).astype(np.float32)
    postings = [np.flatnonzero(V[:, k]) for k in range(N)]
    out = np.empty((Q, q_g.shape[1]), dtype=np.float32)
    for i in range(Q):
        overlap = np.zeros(N, dtype=np.float32)
        for k in np.flatnonzero(V[i]):
            rows = postings[k]
            overlap[rows] += np.minimum(V[i, k], V[rows, k])
        jaccard = 1 - overlap[Q:] / (2 - overlap[Q:])
        out[i] = jaccard * (1 - lambda_value) + dist[i, Q:] * lambda_value
    return out
