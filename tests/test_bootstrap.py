"""The identity bootstrap behind every interval: against a plain loop, and its behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reidbench.errors import ReIDBenchError
from reidbench.metrics import IdentityBootstrap, identity_spread, metric_intervals, rank1_variance_interval
from reidbench.metrics.bootstrap import _draw_counts


def outcomes(identities: int, per_identity: int, seed: int = 0):
    """Per-query outcomes where identities differ in difficulty (as in real data)."""
    rng = np.random.default_rng(seed)
    pids = np.repeat(np.arange(identities) * 3 + 7, per_identity)
    difficulty = rng.random(identities)[np.repeat(np.arange(identities), per_identity)]
    first_hit = np.where(rng.random(pids.size) < difficulty, 0, rng.integers(1, 20, pids.size))
    ap = np.clip(difficulty + 0.2 * rng.standard_normal(pids.size), 0.01, 1.0)
    inp = ap * rng.random(pids.size)
    return first_hit, pids, ap, inp


def test_resampled_means_match_a_loop_over_resamples():
    first_hit, pids, ap, _ = outcomes(12, 3)
    boot = IdentityBootstrap(pids, resamples=50, seed=3)
    rng_counts = _draw_counts(12, 50, 3)
    expected = []
    for counts in rng_counts:  # rebuild every resample's query list and average it
        chosen = np.concatenate([np.tile(np.flatnonzero(pids == boot.identities[u]), int(c))
                                 for u, c in enumerate(counts)])
        expected.append(ap[chosen].mean())
    np.testing.assert_allclose(boot.resampled_means(ap), expected, rtol=1e-12)
    # A resample draws as many identities as there are, with replacement.
    assert (rng_counts.sum(1) == 12).all()


def test_interval_contains_the_estimate_and_shrinks_with_more_identities():
    widths = []
    for identities in (20, 80, 320):
        first_hit, pids, ap, inp = outcomes(identities, 4, seed=identities)
        ci = metric_intervals(first_hit, pids, ap, inp)
        point = {"rank1": (first_hit == 0).mean(), "mAP": ap.mean(), "mINP": inp.mean()}
        for metric, (lo, hi) in ci.items():
            assert lo < point[metric] < hi, (identities, metric)
        widths.append(ci["mAP"][1] - ci["mAP"][0])
    # The width of a mean's interval goes as 1/sqrt(identities): halves per 4x.
    assert widths[0] > 1.5 * widths[1] > 2.25 * widths[2]


def test_identities_move_together():
    # Same queries, same values; grouped as 10 identities of 8 queries (the values of an
    # identity alike) the interval is wider than as 80 identities of one query each.
    rng = np.random.default_rng(1)
    ap = np.repeat(rng.random(10), 8) + 0.01 * rng.random(80)
    grouped = IdentityBootstrap(np.repeat(np.arange(10), 8)).mean_interval(ap)
    separate = IdentityBootstrap(np.arange(80)).mean_interval(ap)
    assert grouped[1] - grouped[0] > 2 * (separate[1] - separate[0])


def test_seeded_and_skips_invalid_queries():
    first_hit, pids, ap, inp = outcomes(30, 3)
    a = metric_intervals(first_hit, pids, ap, inp, seed=0)
    assert a == metric_intervals(first_hit, pids, ap, inp, seed=0)
    assert a != metric_intervals(first_hit, pids, ap, inp, seed=1)
    # Skipped queries (first_hit -1, AP NaN) are left out, not counted as misses.
    fh = np.concatenate([first_hit, [-1, -1]])
    with_skipped = metric_intervals(fh, np.concatenate([pids, [999, 7]]), np.concatenate([ap, [np.nan] * 2]),
                                    np.concatenate([inp, [np.nan] * 2]))
    assert with_skipped == a
    assert "mINP" not in metric_intervals(first_hit, pids, ap)


def test_variance_interval_and_identity_spread():
    first_hit, pids, _, _ = outcomes(60, 4)
    spread = identity_spread(torch.from_numpy(first_hit), torch.from_numpy(pids))
    lo, hi = spread["rank1_var_ci95"]
    assert lo < spread["rank1_var"] < hi
    assert spread["queries_per_identity"] == 4.0 and spread["min_queries_per_identity"] == 4
    assert spread["rank1_var_ci95"] == rank1_variance_interval(first_hit, pids)
    # Every identity equally good: no variance, in every resample.
    assert rank1_variance_interval(np.zeros(40, int), np.repeat(np.arange(10), 4)) == [0.0, 0.0]


def test_bad_input_is_one_line():
    with pytest.raises(ReIDBenchError, match="resamples"):
        IdentityBootstrap(np.arange(3), resamples=1)
    with pytest.raises(ReIDBenchError, match="level"):
        IdentityBootstrap(np.arange(3), level=95)
    with pytest.raises(ReIDBenchError, match="3 queries"):
        IdentityBootstrap(np.arange(3)).mean_interval([0.5, 0.5])
    with pytest.raises(ReIDBenchError, match="query_pids"):
        metric_intervals(np.zeros(4, int), np.arange(3), np.ones(4))
    with pytest.raises(ReIDBenchError, match="non-finite"):
        IdentityBootstrap(np.arange(2)).mean_interval([0.5, np.nan])
    assert IdentityBootstrap(np.zeros(0)).mean_interval(np.zeros(0)) is None
