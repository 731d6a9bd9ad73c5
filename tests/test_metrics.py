"""evaluate_rank against the per-query reference (reidbench.metrics.reference), and
pairwise_distance against cdist."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import reidbench.metrics.rank as rank_module
from reidbench.errors import ReIDBenchError
from reidbench.metrics import RankResult, evaluate_rank, pairwise_distance
from reidbench.metrics.reference import reference_rank


def random_case(seed):
    """A small problem with junk, distractors, same-camera entries, exact ties and
    queries without any valid positive."""
    rng = np.random.default_rng(seed)
    Q = int(rng.integers(1, 25))
    G = int(rng.integers(1, 70))
    n_ids = int(rng.integers(1, 8))
    n_cams = int(rng.integers(1, 4))
    q_pids = rng.integers(1, n_ids + 2, Q)  # some ids never appear in the gallery
    g_pids = rng.integers(0, n_ids + 1, G)  # 0 = distractor
    g_pids[rng.random(G) < 0.15] = -1  # junk
    q_cams = rng.integers(0, n_cams, Q)
    g_cams = rng.integers(0, n_cams, G)
    dist = rng.random((Q, G)).astype(np.float32)
    if seed % 3 == 0:
        dist = np.round(dist, 1)  # many exact ties, between positives and negatives too
    elif seed % 3 == 1:
        dist = np.round(dist * 1000) / 1000
    max_rank = int(rng.choice([1, 5, 50, G + 7]))  # sometimes longer than the gallery
    return dist, q_pids, g_pids, q_cams, g_cams, max_rank


def assert_matches(result: RankResult, expected):
    np.testing.assert_allclose(result.cmc.numpy(), expected["cmc"], rtol=0, atol=1e-12)
    assert result.mAP == pytest.approx(expected["mAP"], abs=1e-12)
    assert result.mINP == pytest.approx(expected["mINP"], abs=1e-12)
    np.testing.assert_allclose(result.per_query_ap.numpy(), expected["per_query_ap"], atol=1e-12)
    np.testing.assert_allclose(result.per_query_inp.numpy(), expected["per_query_inp"], atol=1e-12)
    np.testing.assert_array_equal(result.per_query_first_hit.numpy(), expected["first_hit"])
    np.testing.assert_array_equal(result.valid_query.numpy(), expected["valid"])
    assert result.num_valid == int(expected["valid"].sum())


@pytest.mark.parametrize("ties", ["pessimistic", "index"])
@pytest.mark.parametrize("ap", ["noninterp", "trapezoid"])
@pytest.mark.parametrize("seed", range(60))
def test_matches_brute_force(seed, ap, ties):
    dist, qp, gp, qc, gc, max_rank = random_case(seed)
    expected = reference_rank(dist, qp, gp, qc, gc, max_rank, ap, ties)
    if not expected["valid"].any():
        with pytest.raises(ReIDBenchError, match="no query has a valid match"):
            evaluate_rank(dist, qp, gp, qc, gc, max_rank=max_rank, ap=ap, ties=ties)
        return
    chunk = int(np.random.default_rng(seed).integers(1, 6))  # several query chunks
    result = evaluate_rank(dist, qp, gp, qc, gc, max_rank=max_rank, ap=ap, ties=ties, chunk=chunk)
    assert result.cmc.shape == (max_rank,)
    assert_matches(result, expected)


@pytest.mark.parametrize("ties", ["pessimistic", "index"])
@pytest.mark.parametrize("seed", range(0, 60, 4))
def test_torch_kernels_match_brute_force(seed, ties, monkeypatch):
    # The batched torch path (what runs on an accelerator), exercised on the CPU.
    monkeypatch.setattr(rank_module, "NUMPY_KERNELS", False)
    dist, qp, gp, qc, gc, max_rank = random_case(seed)
    expected = reference_rank(dist, qp, gp, qc, gc, max_rank, "noninterp", ties)
    if expected["valid"].any():
        assert_matches(evaluate_rank(dist, qp, gp, qc, gc, max_rank=max_rank, ties=ties, chunk=3), expected)


def test_larger_problem_with_heavy_ties():
    rng = np.random.default_rng(123)
    Q, G = 60, 900
    qp = rng.integers(1, 40, Q)
    gp = rng.integers(0, 40, G)
    gp[rng.random(G) < 0.1] = -1
    qc = rng.integers(0, 4, Q)
    gc = rng.integers(0, 4, G)
    dist = np.round(rng.random((Q, G)), 2)
    for ap in ("noninterp", "trapezoid"):
        for ties in ("pessimistic", "index"):
            expected = reference_rank(dist, qp, gp, qc, gc, 50, ap, ties)
            assert_matches(evaluate_rank(dist, qp, gp, qc, gc, ap=ap, ties=ties), expected)


@pytest.mark.parametrize("where", ["first", "last", "spread"])
def test_positives_early_or_late_in_long_rows(where):
    # Long rows where the last positive comes early (only a prefix needs ordering) or at
    # the very end (the whole row does), with ties at the boundary.
    rng = np.random.default_rng(5)
    Q, G = 40, 3000
    qp = rng.integers(1, 20, Q)
    gp = rng.integers(0, 20, G)
    gp[rng.random(G) < 0.05] = -1
    qc, gc = rng.integers(0, 3, Q), rng.integers(0, 3, G)
    dist = np.round(rng.random((Q, G)) * 100) / 100 + 0.5
    same = qp[:, None] == gp[None, :]
    if where == "first":
        dist[same] -= 0.5
    elif where == "last":
        dist[same] += 0.5
    for ap in ("noninterp", "trapezoid"):
        for ties in ("pessimistic", "index"):
            assert_matches(evaluate_rank(dist, qp, gp, qc, gc, ap=ap, ties=ties),
                           reference_rank(dist, qp, gp, qc, gc, 50, ap, ties))


def test_hand_computed_example():
    # Query 0 (pid 1, camera 0) against:
    #   g0 pid 1 cam 0, d .10  -> same pid + same camera: removed
    #   g1 pid 2 cam 1, d .20  -> negative            (position 0)
    #   g2 pid 1 cam 1, d .30  -> positive            (position 1)
    #   g3 pid -1 cam 1, d .05 -> junk: removed
    #   g4 pid 0 cam 2, d .40  -> distractor, negative (position 2)
    #   g5 pid 1 cam 2, d .50  -> positive            (position 3)
    # AP = (1/2 + 2/4) / 2 = 1/2; INP = 2/4; first hit at rank 1.
    # Trapezoid AP = 1/2 * ((0 + 1/2)/2 + (1/3 + 2/4)/2) = 1/3.
    # Query 1 (pid 3) has no match in the gallery and is skipped.
    # Query 2 (pid 2, camera 0): g1 is its only positive, tied at d .30 with g2 (a
    # negative with a higher index, so the index tie-break puts g1 first) and behind
    # distractor g4 (d .10): first hit at rank 1, AP = INP = 1/2, trapezoid AP =
    # (0/1 + 1/2) / 2 = 1/4. Pessimistic ties put g2 first: rank 2, AP = INP = 1/3.
    distmat = torch.tensor(
        [
            [0.10, 0.20, 0.30, 0.05, 0.40, 0.50],
            [0.10, 0.20, 0.30, 0.05, 0.40, 0.50],
            [0.90, 0.30, 0.30, 0.00, 0.10, 0.50],
        ]
    )
    q_pids = [1, 3, 2]
    q_cams = [0, 0, 0]
    g_pids = [1, 2, 1, -1, 0, 1]
    g_cams = [0, 1, 1, 1, 2, 2]
    r = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=4, ties="index")
    assert r.per_query_first_hit.tolist() == [1, -1, 1]
    assert r.valid_query.tolist() == [True, False, True]
    assert r.num_valid == 2
    assert r.per_query_ap[0].item() == pytest.approx(0.5)
    assert math.isnan(r.per_query_ap[1].item())
    assert r.per_query_ap[2].item() == pytest.approx(0.5)
    assert r.mAP == pytest.approx(0.5)
    assert r.mINP == pytest.approx(0.5)
    assert r.cmc.tolist() == [0.0, 1.0, 1.0, 1.0]
    t = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=4, ap="trapezoid", ties="index")
    assert t.per_query_ap[0].item() == pytest.approx(1 / 3)
    assert t.per_query_ap[2].item() == pytest.approx(0.25)
    p = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=4)
    assert p.per_query_first_hit.tolist() == [1, -1, 2]
    assert p.per_query_ap[0].item() == pytest.approx(0.5)  # query 0 has no tie
    assert p.per_query_ap[2].item() == pytest.approx(1 / 3)
    assert p.per_query_inp[2].item() == pytest.approx(1 / 3)
    assert p.cmc.tolist() == [0.0, 0.5, 1.0, 1.0]

    # The index tie-break on its own: positive g1 and negative g2 both at d .30, nothing
    # closer; g1 has the lower index and wins. Swapping the gallery order flips it.
    tie = torch.tensor([[0.9, 0.3, 0.3]])
    r = evaluate_rank(tie, [2], [5, 2, 3], [0], [1, 1, 1], ties="index")
    assert r.per_query_first_hit.tolist() == [0]
    r = evaluate_rank(tie[:, [0, 2, 1]], [2], [5, 3, 2], [0], [1, 1, 1], ties="index")
    assert r.per_query_first_hit.tolist() == [1]
    assert r.per_query_ap[0].item() == pytest.approx(0.5)


@pytest.mark.parametrize("numpy_kernels", [True, False])
def test_pessimistic_ties_by_hand(numpy_kernels, monkeypatch):
    monkeypatch.setattr(rank_module, "NUMPY_KERNELS", numpy_kernels)
    # Positive g1 and negative g2 both at d .30: the positive goes second whatever the
    # gallery order, so the index no longer decides.
    tie = torch.tensor([[0.9, 0.3, 0.3]])
    for order, pids in (([0, 1, 2], [5, 2, 3]), ([0, 2, 1], [5, 3, 2])):
        r = evaluate_rank(tie[:, order], [2], pids, [0], [1, 1, 1])
        assert r.per_query_first_hit.tolist() == [1]
        assert r.per_query_ap[0].item() == pytest.approx(0.5)
    # Two positives (pid 7) and three negatives, all at d .2, after one closer negative: the
    # positives take positions 4 and 5 (AP = (1/5 + 2/6) / 2, INP = 2/6), and the
    # distractor (pid 0) at the same distance counts as a negative like any other.
    d = torch.tensor([[0.2, 0.2, 0.1, 0.2, 0.2, 0.2]])
    r = evaluate_rank(d, [7], [7, 0, 4, 7, 9, 4], [0], [1, 1, 1, 2, 1, 1], max_rank=6)
    assert r.per_query_first_hit.tolist() == [4]
    assert r.per_query_ap[0].item() == pytest.approx((1 / 5 + 2 / 6) / 2)
    assert r.mINP == pytest.approx(2 / 6)
    assert r.cmc.tolist() == [0, 0, 0, 0, 1, 1]
    # Junk (pid -1) and the same-camera entry at the tied distance are removed, not negatives;
    # a positive at +inf is last among the valid entries.
    d = torch.tensor([[0.2, 0.2, 0.2, math.inf, 0.1]])
    r = evaluate_rank(d, [7], [-1, 7, 7, 7, 3], [0], [1, 0, 1, 1, 1], max_rank=3)
    assert r.per_query_first_hit.tolist() == [1]
    assert r.per_query_ap[0].item() == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_input_types_and_dtypes_agree():
    dist, qp, gp, qc, gc, _ = random_case(4)
    base = evaluate_rank(dist, qp, gp, qc, gc)
    variants = [
        (torch.from_numpy(dist), torch.from_numpy(qp), gp, qc, torch.from_numpy(gc)),
        (dist.astype(np.float64), qp, gp, qc, gc),
        (np.asfortranarray(dist), qp.astype(np.int32), gp, qc.astype(np.float64), gc),
        (dist.T.copy().T, list(qp), list(gp), list(qc), list(gc)),
    ]
    for args in variants:
        r = evaluate_rank(*args)
        assert r.mAP == pytest.approx(base.mAP, abs=1e-12)
        assert torch.equal(r.per_query_first_hit, base.per_query_first_hit)
    # Negative strides (a reversed NumPy view) are fine too.
    r = evaluate_rank(dist[::-1], qp[::-1], gp, qc[::-1], gc)
    assert torch.equal(r.per_query_first_hit.flip(0), base.per_query_first_hit)
    # Integer and half-precision distances rank exactly like their float64 values.
    ints = (dist * 1000).astype(np.int64)
    r = evaluate_rank(ints, qp, gp, qc, gc)
    assert r.mAP == pytest.approx(evaluate_rank(ints.astype(np.float64), qp, gp, qc, gc).mAP)
    half = torch.from_numpy(dist).half()
    r = evaluate_rank(half, qp, gp, qc, gc)
    assert r.mAP == pytest.approx(evaluate_rank(half.double(), qp, gp, qc, gc).mAP)


def test_infinite_distances_are_ranked_last():
    dist = np.array([[np.inf, 0.5, 0.2, np.inf], [0.1, np.inf, 0.3, 0.2]])
    qp, gp = [1, 2], [1, 2, 3, 1]
    qc, gc = [0, 0], [1, 1, 1, 1]
    r = evaluate_rank(dist, qp, gp, qc, gc, max_rank=4)
    e = reference_rank(dist, qp, gp, qc, gc, 4, "noninterp")
    assert_matches(r, e)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"distmat": np.zeros(5)}, "2-D"),
        ({"distmat": np.zeros((0, 4))}, "empty"),
        ({"q_pids": [1, 2]}, "q_pids"),
        ({"g_pids": [1, 2, 3]}, "g_pids"),
        ({"q_camids": [[0, 0, 0]]}, "q_camids"),
        ({"g_camids": [0, 0, 0, 0, 0]}, "g_camids"),
        ({"q_pids": [1.5, 2, 3]}, "integer"),
        ({"max_rank": 0}, "max_rank"),
        ({"ap": "interpolated"}, "AP convention"),
        ({"chunk": 0}, "chunk"),
        ({"distmat": np.full((3, 4), np.nan)}, "NaN"),
        ({"g_pids": [7, 7, 7, 7]}, "no query has a valid match"),
    ],
)
def test_bad_input_is_a_user_error(kwargs, message):
    args = {
        "distmat": np.random.default_rng(0).random((3, 4)),
        "q_pids": [1, 2, 3],
        "g_pids": [1, 2, 3, -1],
        "q_camids": [0, 0, 0],
        "g_camids": [1, 1, 1, 1],
    }
    args.update(kwargs)
    with pytest.raises(ReIDBenchError, match=message):
        evaluate_rank(**args)


def test_nan_distance_is_a_user_error():
    dist = np.random.default_rng(1).random((4, 30))
    pids = np.arange(30) % 5
    for where in [(2, 17), (1, 3)]:  # at a positive, at a negative
        bad = dist.copy()
        bad[where] = np.nan
        with pytest.raises(ReIDBenchError, match="NaN"):
            evaluate_rank(bad, [0, 1, 2, 3], pids, [0, 0, 0, 0], np.ones(30, dtype=int))


# ---------------------------------------------------------------------------- distances


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_euclidean_matches_cdist(chunk):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 16, generator=g)
    b = torch.randn(53, 16, generator=g)
    d = pairwise_distance(a, b, chunk=chunk)
    assert d.dtype == torch.float32 and d.shape == (37, 53)
    torch.testing.assert_close(d, torch.cdist(a.double(), b.double()).float(), atol=1e-4, rtol=1e-5)
    d64 = pairwise_distance(a.double(), b.double().numpy(), chunk=chunk)  # float64 math, float32 result
    assert d64.dtype == torch.float32
    torch.testing.assert_close(d64, torch.cdist(a.double(), b.double()).float(), atol=1e-6, rtol=1e-6)
    # Plain (not squared) distance, never NaN for identical vectors.
    same = pairwise_distance(a, a)
    assert torch.isfinite(same).all()
    assert same.diagonal().abs().max() < 1e-2


def test_cosine_distance():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, 8, generator=g, dtype=torch.float64)
    b = torch.randn(30, 8, generator=g, dtype=torch.float64)
    d = pairwise_distance(a.numpy(), b.numpy(), metric="cosine", chunk=3)
    expected = 1 - torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, expected.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "a, b, kwargs, message",
    [
        (np.zeros((3, 4)), np.zeros((2, 5)), {}, "feature dimensions differ"),
        (np.zeros(4), np.zeros((2, 4)), {}, "2-D"),
        (np.zeros((3, 4)), np.zeros((2, 4)), {"metric": "manhattan"}, "unknown distance metric"),
        (np.zeros((3, 4)), np.zeros((2, 4)), {"chunk": 0}, "chunk"),
    ],
)
def test_distance_bad_input(a, b, kwargs, message):
    with pytest.raises(ReIDBenchError, match=message):
        pairwise_distance(a, b, **kwargs)


def test_identity_spread_is_variance_of_per_identity_rank1():
    from reidbench.metrics import identity_spread, per_identity_rank1

    # identity 1: 2 of 2 queries hit at rank 1; identity 2: 1 of 2; identity 3: no valid query.
    first_hit = torch.tensor([0, 0, 0, 3, -1])
    pids = torch.tensor([1, 1, 2, 2, 3])
    ids, acc = per_identity_rank1(first_hit, pids)
    assert ids.tolist() == [1, 2] and acc.tolist() == [100.0, 50.0]
    spread = identity_spread(first_hit, pids)
    assert spread["identities"] == 2
    assert abs(spread["rank1_var"] - 625.0) < 1e-9 and abs(spread["rank1_std"] - 25.0) < 1e-9
    assert identity_spread(torch.tensor([-1]), torch.tensor([4]))["rank1_var"] is None
