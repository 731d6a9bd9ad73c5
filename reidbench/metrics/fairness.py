"""Per-identity accuracy and its spread: the bias measure of DDID.

DDID (Debiased Dual-Invariant Defense, arXiv 2511.09933) motivates its data balancing with
the variance of per-identity accuracy across identities, which grows under adversarial
training (18.78 for a normal model, 23.40 after adversarial training, in its Fig. 1). The
paper does not spell out the unit; we read "accuracy" as Rank-1 in percent, so the variance
is in percent squared, and report the standard deviation beside it.
"""

from __future__ import annotations

import torch


def per_identity_rank1(first_hit: torch.Tensor, query_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(identities, Rank-1 in percent per identity) over the valid queries (``first_hit >= 0``)."""
    first_hit, query_pids = torch.as_tensor(first_hit), torch.as_tensor(query_pids)
    valid = first_hit >= 0
    pids, inverse = torch.unique(query_pids[valid], return_inverse=True)
    hits = torch.zeros(len(pids), dtype=torch.float64).index_add_(0, inverse, (first_hit[valid] == 0).double())
    counts = torch.bincount(inverse, minlength=len(pids)).double()
    return pids, 100.0 * hits / counts


def identity_spread(first_hit: torch.Tensor, query_pids: torch.Tensor) -> dict:
    """Variance (population, percent²) and standard deviation of per-identity Rank-1."""
    _, accuracy = per_identity_rank1(first_hit, query_pids)
    if len(accuracy) == 0:
        return {"rank1_var": None, "rank1_std": None, "identities": 0}
    var = float(accuracy.var(unbiased=False))
    return {"rank1_var": var, "rank1_std": var ** 0.5, "identities": int(len(accuracy))}
