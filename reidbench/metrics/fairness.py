"""Per-identity accuracy and its spread: the bias measure of DDID.

DDID (Debiased Dual-Invariant Defense, arXiv 2511.09933) motivates its data balancing with
the variance of per-identity accuracy across identities, which grows under adversarial
training (18.78 for a normal model, 23.40 after adversarial training, in its Fig. 1). The
paper does not spell out the unit; we read "accuracy" as Rank-1 in percent, so the variance
is in percent squared, and report the standard deviation beside it.

With a handful of queries per identity, per-identity Rank-1 takes few values (0, 50 or 100%
with two queries), and its variance is dominated by that sampling noise rather than by bias:
the spread therefore comes with its 95% interval (a bootstrap over identities,
``metrics/bootstrap.py``) and the number of queries per identity.
"""

from __future__ import annotations

import torch

from .bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, rank1_variance_interval


def per_identity_rank1(first_hit: torch.Tensor, query_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(identities, Rank-1 in percent per identity) over the valid queries (``first_hit >= 0``)."""
    first_hit, query_pids = torch.as_tensor(first_hit), torch.as_tensor(query_pids)
    valid = first_hit >= 0
    pids, inverse = torch.unique(query_pids[valid], return_inverse=True)
    hits = torch.zeros(len(pids), dtype=torch.float64).index_add_(0, inverse, (first_hit[valid] == 0).double())
    counts = torch.bincount(inverse, minlength=len(pids)).double()
    return pids, 100.0 * hits / counts


def identity_spread(first_hit: torch.Tensor, query_pids: torch.Tensor, *, resamples: int = DEFAULT_RESAMPLES,
                    level: float = DEFAULT_LEVEL, seed: int = 0) -> dict:
    """Variance (population, percent²) and standard deviation of per-identity Rank-1, the
    variance's interval (``rank1_var_ci95``, a bootstrap over identities) and the mean and
    smallest number of queries per identity."""
    first_hit, query_pids = torch.as_tensor(first_hit), torch.as_tensor(query_pids)
    _, accuracy = per_identity_rank1(first_hit, query_pids)
    if len(accuracy) == 0:
        return {"rank1_var": None, "rank1_std": None, "rank1_var_ci95": None, "identities": 0,
                "queries_per_identity": None, "min_queries_per_identity": None}
    var = float(accuracy.var(unbiased=False))
    valid = first_hit >= 0
    per_id = torch.unique(query_pids[valid], return_counts=True)[1]
    interval = rank1_variance_interval(first_hit.cpu().numpy(), query_pids.cpu().numpy(),
                                       resamples=resamples, level=level, seed=seed)
    return {"rank1_var": var, "rank1_std": var ** 0.5, "rank1_var_ci95": interval, "identities": int(len(accuracy)),
            "queries_per_identity": float(per_id.double().mean()), "min_queries_per_identity": int(per_id.min())}
