"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), sparse and vectorized.

The result matches the authors' published Python code (repo zhunzhong07/person-re-ranking,
``python-version/``): the same squaring and per-column normalization of the stacked
(Q+G) x (Q+G) distance matrix, the same k-reciprocal expansion rule (with round(k1/2)
rounded half to even, as NumPy does), the same query expansion and the same
``1 - m / (2 - m)`` Jaccard distance. What differs is the bookkeeping:

* only the ``k1 + 1`` nearest neighbours of each row are ever needed, so they come from a
  chunked top-k instead of a full argsort of the stacked matrix, and the stacked matrix
  itself is never built -- its rows are read from the three input blocks;
* the encoding ``V`` has a few dozen non-zeros per row, so it is kept as CSR index
  tensors instead of a dense (Q+G)^2 array, and query expansion is a sparse row average;
* the Jaccard term ``sum_k min(V[i,k], V[j,k])`` is a sparse join: for each non-zero
  ``(i, k)`` of a query row, the gallery rows with ``V[j,k] != 0`` come from the column
  index, and the minima are scatter-added into the query's output row.

Everything runs on the device of ``q_g``. The only dense (Q+G)-sized allocation is the
(Q, G) result; the inputs are read in place (column slices where the reference's
transposition calls for columns), so asymmetric ``q_q`` / ``g_g`` are handled exactly
without a transposed copy.
"""

from __future__ import annotations

import warnings
from typing import Union

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from ..errors import ReIDBenchError
from .rank import _numpy_kernels, _Workers, as_tensor

ArrayLike = Union[torch.Tensor, np.ndarray]

# Entries of the stacked matrix per top-k block (the blocks are spread over threads).
_TOPK_ELEMENTS = 1 << 24
# Bookkeeping phases work on large row chunks: every torch op is a parallel region, and
# on a busy machine each region's thread hand-off costs far more than the op itself.
_CHUNK_BYTES = 1 << 26
# (query, column, gallery row) triples expanded at once in the Jaccard join.
_JOIN_PAIRS = 1 << 22
# Extra neighbours taken per block so that re-ordering by the rounded normalized distance
# (the reference ranks float32(d^2) / max, where distinct d may collide) cannot miss one.
_SLACK = 8


def _matrix(x: ArrayLike, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    t = as_tensor(x)
    if t.dim() != 2 or tuple(t.shape) != shape:
        raise ReIDBenchError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    elif t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.to(device)


def _sq32(x: torch.Tensor) -> torch.Tensor:
    # The reference squares in the input precision and then rounds to float32.
    return (x * x).to(torch.float32)


class _Stacked:
    """The reference's working matrix, ``T = M^T`` with ``M = [[qq, qg], [qg^T, gg]]``,
    read from the three blocks without being assembled or transposed.

    Row ``i`` of ``T`` is column ``i`` of ``M``: ``[qq[:, i], qg[i, :]]`` for a query,
    ``[qg[:, g], gg[:, g]]`` for gallery item ``g``.
    """

    def __init__(self, qg: torch.Tensor, qq: torch.Tensor, gg: torch.Tensor):
        self.qg, self.qq, self.gg = qg, qq, gg
        self.Q, self.G = qg.shape
        self.N = self.Q + self.G

    def row_parts(self, r0: int, r1: int) -> tuple[tuple[torch.Tensor, bool], ...]:
        """Rows ``r0:r1`` of ``T`` (all queries or all gallery) as its left (Q columns) and
        right (G columns) parts, each ``(block, transposed)``: a transposed block is a
        (width, rows) column slice of an input, the others are (rows, width) row slices."""
        Q = self.Q
        if r1 <= Q:
            return (self.qq[:, r0:r1], True), (self.qg[r0:r1], False)
        return (self.qg[:, r0 - Q : r1 - Q], True), (self.gg[:, r0 - Q : r1 - Q], True)

    def entries(self, i: torch.Tensor, j: torch.Tensor, query_rows: bool) -> torch.Tensor:
        """``T[i, j]`` for index tensors of equal shape, all ``i`` queries or all gallery."""
        Q = self.Q
        out = torch.empty(i.shape, dtype=self.qg.dtype, device=i.device)
        left = j < Q
        il, jl, ir, jr = i[left], j[left], i[~left], j[~left] - Q
        if query_rows:
            out[left] = self.qq[jl, il]
            out[~left] = self.qg[ir, jr]
        else:
            out[left] = self.qg[jl, il - Q]
            out[~left] = self.gg[jr, ir - Q]
        return out


_GRID = 8  # lines are folded into this many pieces before the first reduction


def _smallest_np(a: np.ndarray, k: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` smallest entries of each line of ``a`` along ``axis``
    (unordered), and each line's minimum. ``axis=1``: rows of a row slice; ``axis=0``:
    columns of a column slice of a row-major matrix.

    ``np.argpartition`` (like ``torch.topk``) over a 19k-long line spends most of its
    time moving every element around. Instead each line is folded into an (8, W/8) grid
    and reduced to the minima of the grid's 8-element columns with one elementwise
    ``np.minimum.reduce`` over contiguous memory (for both orientations, so a column
    slice is never transposed). The ``k`` grid columns with the smallest minima contain
    ``k`` entries no larger than any entry outside them, so the line's ``k`` smallest
    are among their ``8 k`` entries, which are partitioned exactly.
    """
    if axis == 0:
        idx, lo = _smallest_np(a.T, k, 1)
        return idx.T, lo
    B, W = a.shape
    width = W // _GRID
    if k >= W or width <= 2 * k:
        idx = np.argpartition(a, k - 1, axis=1)[:, :k] if k < W else np.broadcast_to(np.arange(W), (B, W))
        return idx, a.min(1)
    main = _GRID * width
    # Element (b, r, c) of the grid is a[b, r * width + c]; a may be a row slice (unit
    # stride along a line) or the transpose of a column slice (unit stride across lines).
    grid = as_strided(a, (B, _GRID, width), (a.strides[0], width * a.strides[1], a.strides[1]))
    col_min = np.minimum.reduce(grid, axis=1)
    lo = col_min.min(1)
    pick = np.argpartition(col_min, k - 1, axis=1)[:, :k]
    cols = (np.arange(_GRID)[None, :, None] * width + pick[:, None, :]).reshape(B, -1)
    if main < W:
        lo = np.minimum(lo, a[:, main:].min(1))
        cols = np.concatenate([cols, np.broadcast_to(np.arange(main, W), (B, W - main))], 1)
    cand = np.take_along_axis(a, cols, 1)
    best = np.argpartition(cand, k - 1, axis=1)[:, :k]
    return np.take_along_axis(cols, best, 1), lo


def _sq32_np(x: np.ndarray) -> np.ndarray:
    return (x * x).astype(np.float32, copy=False)


def _nearest_block_np(parts: tuple[tuple[np.ndarray, bool], ...], offset: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """CPU kernel of :func:`_nearest` for one block of rows: NumPy only, so the worker
    threads never enter torch's own thread pool."""
    cols, vals, peak = [], [], None
    for (a, transposed), off in zip(parts, (0, offset)):
        axis = 0 if transposed else 1
        k = min(K + _SLACK, a.shape[axis])
        hi = a.max(axis)
        c, lo = _smallest_np(a, k, axis)
        if not (np.isfinite(hi).all() and np.isfinite(lo).all()):
            raise ReIDBenchError("the distance matrices contain NaN or infinite values")
        if (lo < 0).any():  # rank by |d|, as squaring does
            a = np.abs(a)
            c, _ = _smallest_np(a, k, axis)
        v = np.take_along_axis(a, c, axis)
        if transposed:
            c, v = c.T, v.T
        vals.append(v)
        cols.append(c + off)
        mag = np.maximum(hi, -lo)
        peak = mag if peak is None else np.maximum(peak, mag)
    norm = np.maximum(_sq32_np(peak), np.finfo(np.float32).tiny)
    c = np.concatenate(cols, 1)
    nd = _sq32_np(np.concatenate(vals, 1)) / norm[:, None]
    order = np.lexsort((c, nd), axis=1)[:, :K]  # by normalized distance, then column
    return np.take_along_axis(c, order, 1), norm


def _nearest_block_torch(
    parts: tuple[tuple[torch.Tensor, bool], ...], offset: int, K: int
) -> tuple[torch.Tensor, torch.Tensor]:
    cols, vals, peak = [], [], None
    for (a, transposed), off in zip(parts, (0, offset)):
        if transposed:
            a = a.T.contiguous()  # cheap on an accelerator
        lo, hi = torch.aminmax(a, dim=1)
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            raise ReIDBenchError("the distance matrices contain NaN or infinite values")
        src = a if bool((lo >= 0).all()) else a.abs()
        v, c = torch.topk(src, min(K + _SLACK, a.shape[1]), dim=1, largest=False, sorted=False)
        vals.append(v)
        cols.append(c + off)
        mag = torch.maximum(hi, -lo)
        peak = mag if peak is None else torch.maximum(peak, mag)
    norm = _sq32(peak).clamp_min_(torch.finfo(torch.float32).tiny)
    c = torch.cat(cols, 1)
    nd = _sq32(torch.cat(vals, 1)) / norm[:, None]
    c, order = torch.sort(c, dim=1)
    order = torch.argsort(nd.gather(1, order), dim=1, stable=True)[:, :K]
    return c.gather(1, order), norm


def _nearest(T: _Stacked, K: int, workers: _Workers) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``K`` nearest columns of every row of ``T`` in the reference's order, and each
    row's normalizer ``max_j float32(T[i, j]^2)``.

    Ranking by ``float32(d^2) / max`` is ranking by ``|d|`` except where rounding makes two
    values collide, so the candidates come from |d| with some slack and a sort of the few
    candidates by (normalized value, column) fixes the order.
    """
    N, Q = T.N, T.Q
    dev = T.qg.device
    step = max(1, min(_TOPK_ELEMENTS // N, -(-N // (4 * workers.count))))
    blocks = [(r0, min(hi, r0 + step)) for lo, hi in ((0, Q), (Q, N)) for r0 in range(lo, hi, step)]
    if not _numpy_kernels(dev):
        knn = torch.empty((N, K), dtype=torch.int64, device=dev)
        sqmax = torch.empty(N, dtype=torch.float32, device=dev)
        for r0, r1 in blocks:
            knn[r0:r1], sqmax[r0:r1] = _nearest_block_torch(T.row_parts(r0, r1), Q, K)
        return knn, sqmax
    knn_np = np.empty((N, K), dtype=np.int64)
    sqmax_np = np.empty(N, dtype=np.float32)

    def work(block: tuple[int, int]) -> None:
        r0, r1 = block
        parts = tuple((p.numpy(), t) for p, t in T.row_parts(r0, r1))
        knn_np[r0:r1], sqmax_np[r0:r1] = _nearest_block_np(parts, Q, K)

    workers.map(work, blocks)
    return torch.from_numpy(knn_np), torch.from_numpy(sqmax_np)


def _reciprocal(knn: torch.Tensor, k: int) -> torch.Tensor:
    """Mask over ``knn[:, :k]``: is row ``i`` also among the ``k`` nearest of that neighbour?"""
    N = knn.shape[0]
    fw = knn[:, :k]
    out = torch.empty(fw.shape, dtype=torch.bool, device=knn.device)
    step = max(1, _CHUNK_BYTES // (8 * k * k))
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        rows = torch.arange(r0, r1, device=knn.device)[:, None]
        out[r0:r1] = (fw[fw[r0:r1]] == rows[:, :, None]).any(2)
    return out


def _encode(
    T: _Stacked, knn: torch.Tensor, sqmax: torch.Tensor, k1: int, kh: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``V`` as CSR (crow, col, val): exp(-distance) weights over the k-reciprocal
    expansion set, normalized to sum 1 (Zhong et al., Eq. 7-8)."""
    N = T.N
    dev = knn.device
    fw = knn[:, :k1]
    rec = _reciprocal(knn, k1)
    fwh = knn[:, :kh]
    rech = _reciprocal(knn, kh)
    rech_size = rech.sum(1)
    sentinel = N
    crow = torch.zeros(N + 1, dtype=torch.int64, device=dev)
    cols_out, vals_out = [], []
    Q = T.Q
    step = max(1, min(_CHUNK_BYTES // (N + 1), _CHUNK_BYTES // (8 * k1 * (kh + 1))))
    chunks = [(r0, min(hi, r0 + step)) for lo, hi in ((0, Q), (Q, N)) for r0 in range(lo, hi, step)]
    # Membership in R(i) through a (rows, N) bitmap: one scatter, one gather, and the
    # same scatter again to clear it for the next chunk (cheaper than re-zeroing).
    bitmap = torch.zeros((step, N), dtype=torch.bool, device=dev)
    for r0, r1 in chunks:
        B = r1 - r0
        f, rmask = fw[r0:r1], rec[r0:r1]
        in_ri = bitmap[:B]
        marked = (torch.arange(B, device=dev)[:, None].expand_as(f)[rmask], f[rmask])
        in_ri[marked] = True
        # Each reciprocal neighbour c of i offers its half-size set R(c, round(k1/2)).
        cset, cmask = fwh[f], rech[f]  # (B, k1, kh)
        inter = (cmask & in_ri.gather(1, cset.reshape(B, -1)).view(cset.shape)).sum(2)
        in_ri[marked] = False
        # |R(c) & R(i)| > 2/3 |R(c)|, in integers (2/3 * n rounds to 2n/3 exactly when 3|n).
        accept = rmask & (3 * inter > 2 * rech_size[f])
        members = torch.cat(
            [
                torch.where(rmask, f, sentinel),
                torch.where(cmask & accept[..., None], cset, sentinel).reshape(B, -1),
            ],
            1,
        )
        members = torch.sort(members, dim=1).values
        keep = members != sentinel
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]
        local_row, pos = torch.nonzero(keep, as_tuple=True)
        col = members[local_row, pos]
        row = local_row + r0
        w = torch.exp(-(_sq32(T.entries(row, col, r1 <= Q)) / sqmax[row]))
        total = torch.zeros(B, dtype=torch.float32, device=dev).index_add_(0, local_row, w)
        vals_out.append(w / total[local_row])
        cols_out.append(col)
        crow[r0 + 1 : r1 + 1] = keep.sum(1)
    return crow.cumsum(0), torch.cat(cols_out), torch.cat(vals_out)


def _expand_segments(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated ranges ``starts[s] + arange(lengths[s])``, with the segment id of each."""
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    offs = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(seg.numel(), device=lengths.device) - offs[seg] + starts[seg]
    return seg, pos


def _query_expand(
    crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, nbrs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row ``i`` becomes the mean of the rows ``nbrs[i]`` (its k2 nearest, itself usually
    first): the local query expansion of Zhong et al., Sec. 4.2, as the sparse product
    ``A @ V`` with ``A[i, nbrs[i]] = 1 / k2``."""
    N, k2 = nbrs.shape
    dev = col.device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR is flagged "beta"
        V = torch.sparse_csr_tensor(crow, col, val, (N, N))
        a_col = torch.sort(nbrs, dim=1).values.reshape(-1)
        a_crow = torch.arange(0, N * k2 + 1, k2, device=dev)
        A = torch.sparse_csr_tensor(a_crow, a_col, torch.full_like(a_col, 1.0 / k2, dtype=val.dtype), (N, N))
        E = A @ V
    return E.crow_indices(), E.col_indices(), E.values()


def _split(cost: torch.Tensor, budget: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ``max_rows`` rows whose summed ``cost`` stays
    within ``budget`` (a range always has at least one row)."""
    csum = torch.cumsum(cost, 0).cpu().numpy()
    bounds, r0, n = [], 0, csum.shape[0]
    while r0 < n:
        base = csum[r0 - 1] if r0 else 0
        r1 = int(np.searchsorted(csum, base + budget, side="right"))
        r1 = min(max(r1, r0 + 1), r0 + max_rows, n)
        bounds.append((r0, r1))
        r0 = r1
    return bounds


@torch.no_grad()
def k_reciprocal_rerank(
    q_g: ArrayLike,
    q_q: ArrayLike,
    g_g: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> torch.Tensor:
    """Re-ranked (Q, G) float32 query-gallery distances (Zhong et al., CVPR 2017).

    ``q_g`` (Q, G), ``q_q`` (Q, Q) and ``g_g`` (G, G) are distance matrices (smaller =
    closer), e.g. from :func:`pairwise_distance`. The result is
    ``(1 - lambda) * d_Jaccard + lambda * d_original`` where ``d_original`` is the squared
    distance normalized as in the authors' code, ``d_Jaccard`` compares the k-reciprocal
    encodings ``V`` (built from ``k1`` neighbours and expanded over the ``k2`` nearest).
    It equals the output of the authors' published Python implementation up to float32
    rounding, including for asymmetric ``q_q`` / ``g_g`` and negative entries. NaN or
    infinite distances are a :class:`ReIDBenchError`.
    """
    for name, v in (("k1", k1), ("k2", k2)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ReIDBenchError(f"{name} must be a positive integer, got {v!r}")
    if not (0.0 <= float(lambda_value) <= 1.0):
        raise ReIDBenchError(f"lambda_value must be in [0, 1], got {lambda_value!r}")
    k1, k2, lam = int(k1), int(k2), float(lambda_value)
    qg0 = as_tensor(q_g)
    if qg0.dim() != 2 or qg0.shape[0] == 0 or qg0.shape[1] == 0:
        raise ReIDBenchError(f"q_g must be a non-empty 2-D (Q, G) matrix, got shape {tuple(qg0.shape)}")
    Q, G = qg0.shape
    dev = qg0.device
    qg = _matrix(qg0, "q_g", (Q, G), dev)
    qq = _matrix(q_q, "q_q", (Q, Q), dev)
    gg = _matrix(g_g, "g_g", (G, G), dev)
    # The reference stacks the blocks into one array, i.e. in their common precision.
    dtype = torch.promote_types(torch.promote_types(qg.dtype, qq.dtype), gg.dtype)
    qg, qq, gg = qg.to(dtype), qq.to(dtype), gg.to(dtype)
    T = _Stacked(qg, qq, gg)
    N = T.N
    # The reference slices initial_rank[:, :k], which silently caps k at N.
    kf = min(k1 + 1, N)
    kh = min(round(k1 / 2) + 1, N)  # round() is half-to-even, like np.around
    kq = min(k2, N)
    with _Workers(dev) as workers:
        knn, sqmax = _nearest(T, max(kf, kq), workers)
    crow, col, val = _encode(T, knn, sqmax, kf, kh)
    if k2 != 1:
        crow, col, val = _query_expand(crow, col, val, knn[:, :kq])

    # Column index of V restricted to gallery rows: the only partners the output needs.
    counts = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(torch.arange(N, device=dev), counts)
    g_sel = rows >= Q
    g_rows, g_cols, g_vals = rows[g_sel], col[g_sel], val[g_sel]
    order = torch.argsort(g_cols, stable=True)
    csc_row = g_rows[order] - Q
    csc_val = g_vals[order]
    csc_len = torch.bincount(g_cols, minlength=N)
    csc_start = torch.cumsum(csc_len, 0) - csc_len

    out = torch.empty((Q, G), dtype=torch.float32, device=dev)
    nq = int(crow[Q])
    q_pairs = torch.zeros(Q, dtype=torch.int64, device=dev).index_add_(0, rows[:nq], csc_len[col[:nq]])
    max_rows = max(1, _CHUNK_BYTES // (4 * G))
    acc = torch.zeros(min(Q, max_rows) * G, dtype=torch.float32, device=dev)  # cleared after use
    for r0, r1 in _split(q_pairs, _JOIN_PAIRS, max_rows):
        e0, e1 = int(crow[r0]), int(crow[r1])
        e_col = col[e0:e1]
        seg, pos = _expand_segments(csc_start[e_col], csc_len[e_col])
        mins = torch.minimum(val[e0:e1][seg], csc_val[pos])
        flat = (rows[e0:e1] - r0)[seg] * G + csc_row[pos]
        m = acc.index_add_(0, flat, mins)[flat]
        acc[flat] = 0.0
        # Where no encoding overlaps (m = 0, nearly everywhere) the Jaccard distance is 1,
        # so the dense part is lambda * original + (1 - lambda); only the entries reached
        # by the join get the full formula. Same float32 operations as the reference.
        o = out[r0:r1]
        x = qg[r0:r1]
        if x.dtype == torch.float32:
            torch.mul(x, x, out=o)
        else:
            o.copy_(_sq32(x))
        o.div_(sqmax[r0:r1, None]).mul_(lam)
        o_flat = o.view(-1)
        joined = (1.0 - m / (2.0 - m)) * (1.0 - lam) + o_flat[flat]
        o.add_(1.0 - lam)
        o_flat[flat] = joined
    return out
