"""Pairwise distances between feature sets, computed in row chunks.

A Market-1501 query x gallery matrix is small, but MSMT17's (11,659 x 82,161) is 3.8 GB
in float32. In float32 every chunk is computed straight into its rows of the result, so
the result is the only large allocation; float64 inputs go through a float64 chunk whose
size is bounded.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ReIDBenchError

ArrayLike = Union[torch.Tensor, np.ndarray]

METRICS = ("euclidean", "cosine")

# Rows per chunk when not given: about this many bytes of (float64) temporaries.
_CHUNK_BYTES = 64 << 20


def _features(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray) and any(st < 0 for st in x.strides):
        x = np.ascontiguousarray(x)  # torch cannot view negative strides
    t = torch.as_tensor(x).detach()
    if t.dim() != 2:
        raise ReIDBenchError(f"{name} must be a 2-D (N, D) feature matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t


@torch.no_grad()
def pairwise_distance(
    a: ArrayLike, b: ArrayLike, metric: str = "euclidean", chunk: Optional[int] = None
) -> torch.Tensor:
    """Distances between every row of ``a`` (Q, D) and every row of ``b`` (G, D).

    ``metric="euclidean"`` is the plain (not squared) L2 distance; ``metric="cosine"`` is
    ``1 - cos(a_i, b_j)`` (an all-zero vector counts as orthogonal to everything, distance 1).
    Returns a float32 (Q, G) tensor on ``a``'s device. ``chunk`` is the number of rows of
    ``a`` handled at a time (by default as many as fit a 64 MB block).
    """
    if metric not in METRICS:
        raise ReIDBenchError(f"unknown distance metric '{metric}' (known: {', '.join(METRICS)})")
    if chunk is not None and (isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1):
        raise ReIDBenchError(f"chunk must be a positive number of rows, got {chunk!r}")
    a = _features(a, "a")
    b = _features(b, "b").to(a.device)
    if a.shape[1] != b.shape[1]:
        raise ReIDBenchError(
            f"feature dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}"
        )
    # float64 inputs stay float64 through the product: cancellation in |a|^2+|b|^2-2ab is
    # what limits the precision of small distances, so only the result is rounded.
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a = a.to(dtype)
    b = b.to(dtype)
    Q, G = a.shape[0], b.shape[0]
    rows = int(chunk) if chunk is not None else max(1, _CHUNK_BYTES // (8 * max(G, 1)))
    out = torch.empty(Q, G, dtype=torch.float32, device=a.device)
    direct = dtype == torch.float32
    if metric == "cosine":
        a = F.normalize(a, dim=1)
        bt = F.normalize(b, dim=1).T
        for s in range(0, Q, rows):
            o = out[s : s + rows]
            block = torch.mm(a[s : s + rows], bt, out=o) if direct else torch.mm(a[s : s + rows], bt)
            block.neg_().add_(1.0)
            if not direct:
                o.copy_(block)
        return out
    bt = b.T
    b_sq = b.pow(2).sum(1).unsqueeze(0)
    a_sq = a.pow(2).sum(1).unsqueeze(1)
    for s in range(0, Q, rows):
        o = out[s : s + rows]
        if direct:
            block = torch.addmm(b_sq, a[s : s + rows], bt, alpha=-2.0, out=o)
        else:
            block = torch.addmm(b_sq, a[s : s + rows], bt, alpha=-2.0)
        block.add_(a_sq[s : s + rows])
        # Rounding can push |a-b|^2 of (nearly) identical vectors slightly below zero.
        block.clamp_min_(0.0).sqrt_()
        if not direct:
            o.copy_(block)
    return out
