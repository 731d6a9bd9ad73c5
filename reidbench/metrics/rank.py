"""CMC, mAP and mINP under the Market-1501 protocol, without argsorting the gallery.

Protocol (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015, as
implemented by torchreid and fast-reid): for each query the gallery entries with the
query's pid *and* camera are removed, entries with pid -1 are junk and removed, every other
entry (distractors with pid 0 included) stays; a query with no positive left is skipped.
The ranking is by distance. A positive and a negative at exactly the same distance are
ordered pessimistically by default (the negative first: a tie is not a success, and the
re-split's gallery is sorted by identity, so the index would favour whichever identity
comes first); ``ties="index"`` is protocol v1's stable sort by gallery index.

CMC, AP and INP (Ye et al., "Deep Learning for Person Re-identification: A Survey and
Outlook", TPAMI 2021) depend only on where the positives land in that ranking. The j-th
positive (0-based, positives ordered by distance then gallery index) sits at position
``j + n_j`` among the valid entries, ``n_j`` being the number of valid negatives ranked
before it. The positives of a query are few and come straight from a pid index of the
gallery; the ``n_j`` are counts of values below thresholds, which a sorted copy of the
row's valid negatives answers with two binary searches per positive (strictly below, and
equal). Only the values are sorted -- SIMD-fast in NumPy, unlike an argsort that drags
an index array along -- and when the last positive is early in the row only the prefix
below it. Pessimistic ties need nothing more: ``n_j`` is the count below plus the count
equal. Under the index tie-break an exact tie between a positive and a valid negative is
the one case where the index matters; the "equal" count detects it and those few pairs are
resolved exactly.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from ..errors import ReIDBenchError

ArrayLike = Union[torch.Tensor, np.ndarray]

AP_CONVENTIONS = ("noninterp", "trapezoid")
TIE_RULES = ("pessimistic", "index")

# Query rows per chunk are picked so that one chunk of the distance matrix is about this
# big (it bounds the converted copy of half-precision or integer inputs); the per-query
# bookkeeping is (rows x positives) and small.
_CHUNK_BYTES = 64 << 20
# Bound on the (pairs x gallery) temporaries of the exact tie resolution.
_TIE_ELEMENTS = 1 << 22
# Stride of the sample that decides between sorting a whole row and its prefix.
_SAMPLE = 64


# The CPU hot loops run in NumPy (SIMD sorts and reductions, and no OpenMP hand-off per
# op); elsewhere, and when tests switch this off to exercise it on the CPU, the same
# steps run as batched torch ops.
NUMPY_KERNELS = True


def _numpy_kernels(device: torch.device) -> bool:
    return NUMPY_KERNELS and device.type == "cpu"


class _Workers:
    """Threads for the NumPy kernels (which release the GIL), one per torch thread;
    ``None`` inside the ``with`` block when a single thread will do."""

    def __init__(self, device: torch.device):
        self.count = torch.get_num_threads() if _numpy_kernels(device) else 1
        self.pool = ThreadPoolExecutor(self.count) if self.count > 1 else None

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def map(self, fn, items: list) -> None:
        if self.pool is None:
            for item in items:
                fn(item)
        else:
            list(self.pool.map(fn, items))


@dataclass
class RankResult:
    """Result of :func:`evaluate_rank`; tensors are on the CPU.

    ``cmc[r]`` is the fraction of valid queries whose first true match is within rank
    ``r`` (0-based). ``per_query_ap`` is NaN and ``per_query_first_hit`` is -1 for queries
    that were skipped (no valid positive in the gallery).
    """

    cmc: torch.Tensor
    mAP: float
    mINP: float
    per_query_ap: torch.Tensor
    per_query_first_hit: torch.Tensor
    valid_query: torch.Tensor
    num_valid: int
    per_query_inp: Optional[torch.Tensor] = None  # NaN for skipped queries, like per_query_ap


def as_tensor(x: ArrayLike) -> torch.Tensor:
    """``torch.as_tensor`` without a copy where possible, detached; NumPy views with
    negative strides (which torch cannot view) are copied."""
    if isinstance(x, np.ndarray) and any(st < 0 for st in x.strides):
        x = np.ascontiguousarray(x)
    return torch.as_tensor(x).detach()


def _ids(x: ArrayLike, name: str, n: int, what: str, device: torch.device) -> torch.Tensor:
    t = as_tensor(x)
    if t.dim() != 1 or t.shape[0] != n:
        raise ReIDBenchError(
            f"{name} must be a 1-D array with one entry per {what} ({n}), got shape {tuple(t.shape)}"
        )
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ReIDBenchError(f"{name} must hold integer ids")
    elif t.dtype == torch.bool or t.is_complex():
        raise ReIDBenchError(f"{name} must hold integer ids, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types sort slowly or not at all in NumPy; both widen exactly to float32.
    # Integer distances widen to float64, which is exact below 2**53.
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype.is_floating_point:
        return torch.float32
    return torch.float64


class _GalleryIndex:
    """Gallery entries grouped by pid, so a query's same-pid entries are a slice."""

    def __init__(self, g_pids: torch.Tensor):
        self.order = torch.argsort(g_pids, stable=True)
        pids, counts = torch.unique_consecutive(g_pids[self.order], return_counts=True)
        self.pids = pids
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts

    def lookup(self, q_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, count) of each query pid's slice of ``order``; count 0 when absent.

        pid -1 gets count 0: junk is removed wholesale, never as "same pid".
        """
        k = torch.searchsorted(self.pids, q_pids).clamp_(max=self.pids.numel() - 1)
        found = (self.pids[k] == q_pids) & (q_pids != -1)
        return self.starts[k], torch.where(found, self.counts[k], torch.zeros_like(k))


def _negatives_below(
    dist: torch.Tensor,
    rows: torch.Tensor,
    thresholds: torch.Tensor,
    same: torch.Tensor,
    same_count: torch.Tensor,
    n_pos: torch.Tensor,
    junk: torch.Tensor,
    workers: _Workers,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``r`` of ``rows`` and threshold ``t = thresholds[r, j]``: how many valid
    negatives of ``dist[r]`` are ``< t`` and how many are ``== t``.

    Junk columns and the row's same-pid columns (``same[r, :same_count[r]]``) are set to
    +inf in a copy of the row, the copy (or only its values up to the row's last
    threshold, ``thresholds[r, n_pos[r] - 1]``) is sorted, and two binary searches per
    threshold give both counts. (A threshold of +inf overcounts the ties; that only sends
    it through the exact tie resolution.) Returns (B, S) int64 tensors, zero for rows not
    in ``rows``.
    """
    B, S = thresholds.shape
    G = dist.shape[1]
    if not _numpy_kernels(dist.device):
        x = dist[rows].clone()
        if junk.numel():
            x.index_fill_(1, junk, math.inf)
        slot = torch.arange(same.shape[1], device=dist.device)
        keep = slot < same_count[rows, None]
        local = torch.arange(rows.numel(), device=dist.device)[:, None].expand_as(keep)
        x[local[keep], same[rows][keep]] = math.inf
        x = torch.sort(x, dim=1).values
        if bool(torch.isnan(x[:, -1]).any()):
            raise ReIDBenchError("distmat contains NaN")
        t = thresholds[rows].contiguous()
        lo = torch.searchsorted(x, t, side="left")
        lt = torch.zeros((B, S), dtype=torch.int64, device=dist.device)
        eq = torch.zeros_like(lt)
        lt[rows] = lo
        eq[rows] = torch.searchsorted(x, t, side="right") - lo
        return lt, eq

    # CPU: one row at a time, copy -> mask -> sort -> search, while the row is in cache.
    # NumPy's sort is a SIMD (AVX-512/AVX2) sort and releases the GIL, so threads scale;
    # torch.sort is several times slower here because it also builds an index array.
    d_np = dist.numpy()
    t_np = thresholds.numpy()
    same_np = same.numpy()
    count_np = same_count.numpy()
    n_pos_np = n_pos.numpy()
    junk_np = junk.numpy()
    rows_np = rows.numpy()
    lt = np.zeros((B, S), dtype=np.int64)
    eq = np.zeros((B, S), dtype=np.int64)
    nan_rows: list[int] = []

    def work(part: np.ndarray) -> None:
        buf = np.empty(G, dtype=d_np.dtype)
        for r in part:
            np.copyto(buf, d_np[r])
            if junk_np.size:
                buf[junk_np] = np.inf
            buf[same_np[r, : count_np[r]]] = np.inf
            t = t_np[r]
            last = t[n_pos_np[r] - 1]
            # Negatives beyond the last positive change no count: when a strided sample
            # says they are the bulk of the row, sort only the values up to it.
            if np.count_nonzero(buf[::_SAMPLE] <= last) * 2 < buf[::_SAMPLE].size:
                if np.isnan(buf.max()):
                    nan_rows.append(int(r))
                    continue
                line = buf[buf <= last]
                line.sort()
            else:
                buf.sort()
                if buf[-1] != buf[-1]:
                    nan_rows.append(int(r))
                    continue
                line = buf
            lo = line.searchsorted(t, side="left")
            lt[r] = lo
            eq[r] = line.searchsorted(t, side="right") - lo

    workers.map(work, [p for p in np.array_split(rows_np, workers.count) if p.size])
    if nan_rows:
        raise ReIDBenchError("distmat contains NaN")
    return torch.from_numpy(lt), torch.from_numpy(eq)


def _tie_before(
    dist: torch.Tensor,
    rows: torch.Tensor,
    value: torch.Tensor,
    col: torch.Tensor,
    q_pid: torch.Tensor,
    g_pids: torch.Tensor,
) -> torch.Tensor:
    """Per (row, value, col): valid negatives in ``dist[row]`` equal to ``value`` with a
    smaller gallery index than ``col`` -- the ones the stable tie-break ranks first."""
    G = dist.shape[1]
    out = torch.empty_like(rows)
    arange = torch.arange(G, device=dist.device)
    not_junk = g_pids != -1
    step = max(1, _TIE_ELEMENTS // max(G, 1))
    for s in range(0, rows.numel(), step):
        r = rows[s : s + step]
        hit = dist[r] == value[s : s + step, None]
        hit &= arange < col[s : s + step, None]
        hit &= g_pids != q_pid[s : s + step, None]
        hit &= not_junk
        out[s : s + step] = hit.sum(1)
    return out


def _evaluate_chunk(
    Dc: torch.Tensor,
    wdt: torch.dtype,
    qp: torch.Tensor,
    qc: torch.Tensor,
    gp: torch.Tensor,
    gc: torch.Tensor,
    gallery: "_GalleryIndex",
    start: torch.Tensor,
    count: torch.Tensor,
    junk: torch.Tensor,
    ap: str,
    ties: str,
    workers: _Workers,
    first_hit: torch.Tensor,
    ap_out: torch.Tensor,
    inp_out: torch.Tensor,
) -> None:
    """Fill the per-query outputs (views) for one block of query rows."""
    G = Dc.shape[1]
    S = int(count.max())
    if S == 0:
        return
    if Dc.dtype != wdt:
        Dc = Dc.to(wdt)
    # The query's same-pid gallery entries: the positives (other cameras) and the
    # same-camera ones that the protocol removes.
    slot = torch.arange(S, device=Dc.device)
    same_mask = slot < count[:, None]
    same = gallery.order[(start[:, None] + slot).clamp_(max=G - 1)]
    d_same = Dc.gather(1, same)
    if bool(torch.isnan(d_same[same_mask]).any()):
        raise ReIDBenchError("distmat contains NaN")
    is_pos = same_mask & (gc[same] != qc[:, None])
    n_pos = is_pos.sum(1)
    rows = torch.nonzero(n_pos).flatten()
    if rows.numel() == 0:
        return

    # Positives sorted by (distance, gallery index): same-pid entries come in index order,
    # a stable sort moves the non-positives behind the positives, a second stable sort
    # orders by distance without disturbing either (the padding is +inf and stays last).
    perm = torch.argsort((~is_pos).to(torch.int8), dim=1, stable=True)
    pd = torch.where(is_pos, d_same, torch.full_like(d_same, math.inf)).gather(1, perm)
    pc = same.gather(1, perm)
    perm = torch.argsort(pd, dim=1, stable=True)
    pd = pd.gather(1, perm).contiguous()
    pc = pc.gather(1, perm)
    real = slot < n_pos[:, None]

    neg_before, neg_equal = _negatives_below(Dc, rows, pd, same, count, n_pos, junk, workers)
    neg_before = neg_before.to(Dc.device)
    neg_equal = neg_equal.to(Dc.device)
    if ties == "pessimistic":
        # Every tied negative goes first. At a +inf threshold the "equal" count also holds
        # the row's masked (+inf) entries; capping at the row's number of valid negatives
        # (all of which are <= +inf) removes them.
        n_neg = (G - junk.numel() - count)[:, None]
        neg_before = torch.minimum(neg_before + neg_equal, n_neg)
    elif bool((tied := real & (neg_equal > 0)).any()):
        tr, tj = torch.nonzero(tied, as_tuple=True)
        neg_before[tr, tj] += _tie_before(Dc, tr, pd[tr, tj], pc[tr, tj], qp[tr], gp)

    rank = (slot + neg_before).to(torch.float64)  # 0-based position among valid entries
    k = (slot + 1).to(torch.float64)
    if ap == "noninterp":
        contrib = k / (rank + 1)
    else:
        old = torch.where(rank > 0, (k - 1) / rank.clamp_min(1), torch.ones_like(rank))
        contrib = (old + k / (rank + 1)) / 2
    npos = n_pos.to(torch.float64)
    ap_c = torch.where(real, contrib, torch.zeros_like(contrib)).sum(1) / npos.clamp_min(1)
    last = rank.gather(1, (n_pos - 1).clamp_min(0)[:, None]).squeeze(1)
    inp_c = npos / (last + 1)
    ap_out[rows] = ap_c[rows]
    inp_out[rows] = inp_c[rows]
    first_hit[rows] = neg_before[rows, 0]


@torch.no_grad()
def evaluate_rank(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    ap: str = "noninterp",
    *,
    ties: str = "pessimistic",
    chunk: Optional[int] = None,
) -> RankResult:
    """CMC, mAP and mINP of a (Q, G) query-gallery distance matrix (smaller = closer).

    Market-1501 protocol (Zheng et al., ICCV 2015): same pid + same camera entries and pid
    -1 junk are removed per query, distractors (pid 0) stay as negatives, queries without a
    valid positive are skipped. ``ties="pessimistic"`` ranks a positive after every negative
    at the same distance (protocol v2); ``ties="index"`` orders them by gallery index (v1).

    ``ap="noninterp"`` is the usual non-interpolated AP (mean precision at each hit);
    ``ap="trapezoid"`` is the official Market-1501 MATLAB code's AP, which averages the
    precision before and at each hit. mINP is the mean inverse negative penalty of Ye et
    al. (TPAMI 2021): ``num_positives / (rank_of_last_positive + 1)`` per query.
    ``cmc`` has ``max_rank`` entries even when the gallery is shorter (they saturate).

    Inputs may be torch tensors (any device; the work stays there) or NumPy arrays.
    ``chunk`` overrides the number of query rows processed at a time.
    """
    if ap not in AP_CONVENTIONS:
        raise ReIDBenchError(f"unknown AP convention '{ap}' (known: {', '.join(AP_CONVENTIONS)})")
    if ties not in TIE_RULES:
        raise ReIDBenchError(f"unknown tie rule '{ties}' (known: {', '.join(TIE_RULES)})")
    if isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 1:
        raise ReIDBenchError(f"max_rank must be a positive integer, got {max_rank!r}")
    max_rank = int(max_rank)
    D = as_tensor(distmat)
    if D.dim() != 2:
        raise ReIDBenchError(f"distmat must be a 2-D (num_query, num_gallery) matrix, got shape {tuple(D.shape)}")
    Q, G = D.shape
    if Q == 0 or G == 0:
        raise ReIDBenchError(f"distmat is empty (shape {tuple(D.shape)})")
    if D.is_complex() or D.dtype == torch.bool:
        raise ReIDBenchError(f"distmat must be real-valued, got dtype {D.dtype}")
    dev = D.device
    qp = _ids(q_pids, "q_pids", Q, "query (distmat row)", dev)
    gp = _ids(g_pids, "g_pids", G, "gallery entry (distmat column)", dev)
    qc = _ids(q_camids, "q_camids", Q, "query (distmat row)", dev)
    gc = _ids(g_camids, "g_camids", G, "gallery entry (distmat column)", dev)
    if chunk is not None and (int(chunk) != chunk or chunk < 1):
        raise ReIDBenchError(f"chunk must be a positive number of rows, got {chunk!r}")

    wdt = _work_dtype(D.dtype)
    rows_per_chunk = min(Q, int(chunk) if chunk else max(1, _CHUNK_BYTES // (G * torch.finfo(wdt).bits // 8)))
    gallery = _GalleryIndex(gp)
    q_start, q_count = gallery.lookup(qp)
    junk = torch.nonzero(gp == -1).flatten()

    first_hit = torch.full((Q,), -1, dtype=torch.int64, device=dev)
    ap_q = torch.full((Q,), math.nan, dtype=torch.float64, device=dev)
    inp_q = torch.full((Q,), math.nan, dtype=torch.float64, device=dev)
    with _Workers(dev) as workers:
        for r0 in range(0, Q, rows_per_chunk):
            r1 = min(Q, r0 + rows_per_chunk)
            _evaluate_chunk(
                D[r0:r1], wdt, qp[r0:r1], qc[r0:r1], gp, gc, gallery,
                q_start[r0:r1], q_count[r0:r1], junk, ap, ties, workers,
                first_hit[r0:r1], ap_q[r0:r1], inp_q[r0:r1],
            )

    valid_query = first_hit >= 0
    num_valid = int(valid_query.sum())
    if num_valid == 0:
        raise ReIDBenchError(
            "no query has a valid match in the gallery (same pid, different camera, pid != -1)"
        )
    hits = torch.bincount(first_hit[valid_query].clamp(max=max_rank), minlength=max_rank + 1)
    cmc = hits[:max_rank].cumsum(0).to(torch.float64) / num_valid
    return RankResult(
        cmc=cmc.cpu(),
        mAP=float(ap_q[valid_query].mean()),
        mINP=float(inp_q[valid_query].mean()),
        per_query_ap=ap_q.cpu(),
        per_query_first_hit=first_hit.cpu(),
        valid_query=valid_query.cpu(),
        num_valid=num_valid,
        per_query_inp=inp_q.cpu(),
    )
