"""95% intervals of Rank-1 / mAP / mINP and of the per-identity variance, by a bootstrap
over test identities.

The queries of one identity are not independent draws: they are photos of the same person,
often near-duplicates, and a model that fails on that person fails on most of them. So the
unit that is resampled is the identity (a cluster bootstrap; Davison & Hinkley 1997,
Sec. 3.8): a resample draws the test identities with replacement and keeps every query of
each drawn identity. A metric over queries (the mean of per-query AP, rank-1 hits or INP)
on a resample is ``sum_u w_u S_u / sum_u w_u n_u`` -- ``w_u`` the number of times identity
``u`` was drawn, ``S_u`` the sum of the per-query values of its ``n_u`` queries -- so all
resamples are one matrix product of the (resamples x identities) draw counts with the
per-identity sums. The interval is the percentile interval of the resampled values.

The draws depend only on the seed and the number of identities, so every cell evaluated on
the same split is resampled the same way (its interval and the worst case's agree in kind).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from ..errors import ReIDBenchError

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


@lru_cache(maxsize=16)
def _draw_counts(identities: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, identities) float64: how often each identity is drawn in each resample.
    Cached (read-only): a leaderboard resamples every cell of a split the same way."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, identities, size=(resamples, identities))
    flat = (picks + identities * np.arange(resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=resamples * identities).reshape(resamples, identities).astype(np.float64)
    counts.flags.writeable = False
    return counts


@dataclass
class IdentityBootstrap:
    """Resampling of the valid queries by identity. ``pids`` holds one identity per valid
    query; every array given to the methods is aligned with it."""

    pids: np.ndarray
    resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.resamples, bool) or int(self.resamples) != self.resamples or self.resamples < 2:
            raise ReIDBenchError(f"resamples must be an integer >= 2, got {self.resamples!r}")
        if not 0.0 < float(self.level) < 1.0:
            raise ReIDBenchError(f"level must lie in (0, 1), got {self.level!r}")
        pids = np.asarray(self.pids)
        if pids.ndim != 1:
            raise ReIDBenchError(f"pids must be 1-D (one identity per query), got shape {pids.shape}")
        self.identities, self.inverse = np.unique(pids, return_inverse=True)
        self.inverse = self.inverse.ravel()
        self.counts = np.bincount(self.inverse, minlength=len(self.identities)).astype(np.float64)
        self.weights = _draw_counts(len(self.identities), int(self.resamples), int(self.seed)) \
            if len(self.identities) else np.zeros((int(self.resamples), 0))

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    def _bounds(self, stats: np.ndarray) -> list[float]:
        tail = (1.0 - float(self.level)) / 2
        lo, hi = np.quantile(stats, [tail, 1.0 - tail])
        return [float(lo), float(hi)]

    def _aligned(self, values, name: str) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != self.inverse.shape:
            raise ReIDBenchError(f"{name}: {values.shape[0] if values.ndim else 0} values for "
                                 f"{self.inverse.shape[0]} queries")
        if not np.isfinite(values).all():
            raise ReIDBenchError(f"{name}: non-finite per-query value (skipped queries must be left out)")
        return values

    def resampled_means(self, values) -> np.ndarray:
        """The mean over queries of ``values`` in every resample."""
        values = self._aligned(values, "values")
        sums = np.bincount(self.inverse, weights=values, minlength=self.num_identities)
        return (self.weights @ sums) / (self.weights @ self.counts)

    def mean_interval(self, values) -> Optional[list[float]]:
        """[lo, hi] of the mean over queries of ``values``; None without any query."""
        if self.num_identities == 0:
            return None
        return self._bounds(self.resampled_means(values))

    def per_identity_mean(self, values) -> np.ndarray:
        values = self._aligned(values, "values")
        return np.bincount(self.inverse, weights=values, minlength=self.num_identities) / self.counts

    def variance_interval(self, values) -> Optional[list[float]]:
        """[lo, hi] of the population variance, across identities, of the per-identity mean
        of ``values`` (in the unit of ``values`` squared); None without any identity."""
        if self.num_identities == 0:
            return None
        a = self.per_identity_mean(values)
        n = float(self.num_identities)  # every resample draws as many identities as there are
        mean = (self.weights @ a) / n
        var = np.maximum((self.weights @ (a * a)) / n - mean * mean, 0.0)
        return self._bounds(var)


def query_outcomes(first_hit, ap, inp=None) -> dict[str, np.ndarray]:
    """Per-query Rank-1 hit, AP and (when given) INP of the valid queries, as floats."""
    first_hit = np.asarray(first_hit)
    valid = first_hit >= 0
    out = {"rank1": (first_hit[valid] == 0).astype(np.float64), "mAP": np.asarray(ap, dtype=np.float64)[valid]}
    if inp is not None:
        out["mINP"] = np.asarray(inp, dtype=np.float64)[valid]
    return out


def metric_intervals(first_hit, query_pids, ap, inp=None, *, resamples: int = DEFAULT_RESAMPLES,
                     level: float = DEFAULT_LEVEL, seed: int = 0) -> dict:
    """``{"rank1": [lo, hi], "mAP": [lo, hi], "mINP": [lo, hi]}`` (fractions) over the valid
    queries (``first_hit >= 0``) of one evaluation; ``mINP`` only when ``inp`` is given.
    ``ap`` and ``inp`` may hold NaN for the skipped queries."""
    first_hit = np.asarray(first_hit)
    pids = np.asarray(query_pids)
    if pids.shape != first_hit.shape:
        raise ReIDBenchError(f"query_pids has {pids.size} entries for {first_hit.size} queries")
    boot = IdentityBootstrap(pids[first_hit >= 0], resamples, level, seed)
    return {name: boot.mean_interval(values) for name, values in query_outcomes(first_hit, ap, inp).items()}


def rank1_variance_interval(first_hit, query_pids, *, resamples: int = DEFAULT_RESAMPLES,
                            level: float = DEFAULT_LEVEL, seed: int = 0) -> Optional[list[float]]:
    """[lo, hi] of the per-identity Rank-1 variance (percent squared, as
    :func:`reidbench.metrics.identity_spread`)."""
    first_hit = np.asarray(first_hit)
    valid = first_hit >= 0
    boot = IdentityBootstrap(np.asarray(query_pids)[valid], resamples, level, seed)
    return boot.variance_interval(100.0 * (first_hit[valid] == 0))
