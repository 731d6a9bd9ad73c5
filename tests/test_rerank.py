"""k_reciprocal_rerank against the loop-based reference of Zhong et al. (CVPR 2017) in
reidbench.metrics.reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reidbench.metrics.rank as rank_module
from reidbench.errors import ReIDBenchError
from reidbench.metrics import evaluate_rank, k_reciprocal_rerank, pairwise_distance
from reidbench.metrics.reference import reference_rerank


def clustered(n_query, n_gallery, n_clusters, dim, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim)) * 2
    q_ids = rng.integers(0, n_clusters, n_query)
    g_ids = rng.integers(0, n_clusters, n_gallery)
    q = centers[q_ids] + spread * rng.normal(size=(n_query, dim))
    g = centers[g_ids] + spread * rng.normal(size=(n_gallery, dim))
    return torch.tensor(q, dtype=torch.float32), torch.tensor(g, dtype=torch.float32), q_ids, g_ids


def distances(q, g):
    return pairwise_distance(q, g), pairwise_distance(q, q), pairwise_distance(g, g)


@pytest.mark.parametrize(
    "k1, k2, lam",
    [(20, 6, 0.3), (20, 1, 0.3), (5, 3, 0.5), (7, 2, 0.0), (3, 1, 1.0), (1, 1, 0.3), (10, 12, 0.3)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(seed, k1, k2, lam):
    q, g, _, _ = clustered(30, 120, n_clusters=6, dim=8, seed=seed)
    q_g, q_q, g_g = distances(q, g)
    expected = reference_rerank(q_g.numpy(), q_q.numpy(), g_g.numpy(), k1, k2, lam)
    got = k_reciprocal_rerank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == (30, 120) and got.dtype == torch.float32
    assert np.abs(got.numpy() - expected).max() < 1e-5


@pytest.mark.parametrize("k1, k2", [(50, 6), (50, 60), (3, 60)])
def test_neighbourhoods_larger_than_the_data(k1, k2):
    # The reference slices its ranking, so k1 + 1 and k2 beyond Q + G mean "everything".
    q, g, _, _ = clustered(8, 30, n_clusters=3, dim=4, seed=4)
    q_g, q_q, g_g = distances(q, g)
    expected = reference_rerank(q_g.numpy(), q_q.numpy(), g_g.numpy(), k1, k2, 0.3)
    got = k_reciprocal_rerank(q_g, q_q, g_g, k1=k1, k2=k2)
    assert np.abs(got.numpy() - expected).max() < 1e-5


def test_asymmetric_negative_float64_inputs():
    # The reference normalizes columns and transposes; with asymmetric q_q / g_g that is
    # not the same as normalizing rows, and negative distances flip order when squared.
    rng = np.random.default_rng(3)
    q_g = rng.random((12, 70)) - 0.2
    q_q = rng.random((12, 12))
    g_g = rng.random((70, 70)) - 0.1
    for k1, k2 in [(8, 3), (20, 6)]:
        expected = reference_rerank(q_g, q_q, g_g, k1, k2, 0.3)
        got = k_reciprocal_rerank(q_g, q_q, g_g, k1=k1, k2=k2)
        assert np.abs(got.numpy() - expected).max() < 1e-5


def test_matches_reference_on_wide_rows():
    # Rows wide enough for the blocked nearest-neighbour search (and both of its
    # orientations) rather than a plain partition.
    q, g, _, _ = clustered(60, 1000, n_clusters=40, dim=16, seed=7, spread=0.8)
    q_g, q_q, g_g = distances(q, g)
    expected = reference_rerank(q_g.numpy(), q_q.numpy(), g_g.numpy(), 6, 3, 0.3)
    got = k_reciprocal_rerank(q_g, q_q, g_g, k1=6, k2=3, lambda_value=0.3)
    assert np.abs(got.numpy() - expected).max() < 1e-5


def test_torch_kernels_match_reference(monkeypatch):
    # The batched torch path (what runs on an accelerator), exercised on the CPU.
    monkeypatch.setattr(rank_module, "NUMPY_KERNELS", False)
    q, g, _, _ = clustered(40, 700, n_clusters=25, dim=8, seed=2)
    q_g, q_q, g_g = distances(q, g)
    expected = reference_rerank(q_g.numpy(), q_q.numpy(), g_g.numpy(), 12, 4, 0.3)
    got = k_reciprocal_rerank(q_g, q_q, g_g, k1=12, k2=4, lambda_value=0.3)
    assert np.abs(got.numpy() - expected).max() < 1e-5


def test_improves_map_on_clustered_identities():
    # 30 identities, 2 queries and 10 gallery images each, over 3 cameras; noisy enough
    # that plain distances make mistakes the k-reciprocal neighbourhoods fix.
    rng = np.random.default_rng(0)
    n_ids, dim = 30, 16
    centers = rng.normal(size=(n_ids, dim))
    q_pids = np.repeat(np.arange(n_ids), 2)
    g_pids = np.repeat(np.arange(n_ids), 10)
    q = centers[q_pids] + 0.8 * rng.normal(size=(len(q_pids), dim))
    g = centers[g_pids] + 0.8 * rng.normal(size=(len(g_pids), dim))
    q_cams = np.zeros(len(q_pids), dtype=int)
    g_cams = rng.integers(1, 3, len(g_pids))
    q_g, q_q, g_g = distances(torch.tensor(q), torch.tensor(g))
    before = evaluate_rank(q_g, q_pids, g_pids, q_cams, g_cams)
    after = evaluate_rank(k_reciprocal_rerank(q_g, q_q, g_g), q_pids, g_pids, q_cams, g_cams)
    assert before.mAP < 0.8  # (0.72 here)
    assert after.mAP > before.mAP + 0.1  # (0.88 here)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((np.ones((3, 5)), np.ones((3, 3)), np.ones((4, 4))), {}, "g_g must have shape"),
        ((np.ones((3, 5)), np.ones((5, 5)), np.ones((5, 5))), {}, "q_q must have shape"),
        ((np.ones(5), np.ones((3, 3)), np.ones((5, 5))), {}, "q_g must be"),
        ((np.ones((3, 5)), np.ones((3, 3)), np.ones((5, 5))), {"k1": 0}, "k1"),
        ((np.ones((3, 5)), np.ones((3, 3)), np.ones((5, 5))), {"k2": 1.5}, "k2"),
        ((np.ones((3, 5)), np.ones((3, 3)), np.ones((5, 5))), {"lambda_value": 1.5}, "lambda_value"),
        ((np.full((3, 5), np.nan), np.ones((3, 3)), np.ones((5, 5))), {}, "NaN"),
    ],
)
def test_bad_input_is_a_user_error(args, kwargs, message):
    with pytest.raises(ReIDBenchError, match=message):
        k_reciprocal_rerank(*args, **kwargs)
