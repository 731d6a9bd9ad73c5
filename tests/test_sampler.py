"""PKSampler: P distinct identities x K images per batch, deterministic per (seed, epoch)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from reidbench.data.sampler import PKSampler
from reidbench.errors import ReIDBenchError


def make_pids(counts: dict[int, int]) -> torch.Tensor:
    """Interleaved ids, so an identity's images are not contiguous in the dataset."""
    pids = [pid for pid, n in counts.items() for _ in range(n)]
    g = torch.Generator().manual_seed(0)
    return torch.tensor(pids)[torch.randperm(len(pids), generator=g)]


# 37 identities (not a multiple of P), some with fewer than K images
COUNTS = {100 + i: 1 + (i * 7) % 9 for i in range(37)}


def batches(sampler) -> list[torch.Tensor]:
    return [b.clone() for b in sampler]


def test_batch_shape_and_identities():
    pids = make_pids(COUNTS)
    sampler = PKSampler(pids, p=8, k=4, seed=3)
    out = batches(sampler)
    assert len(out) == len(sampler) == 5  # ceil(37 / 8)
    for batch in out:
        assert batch.dtype == torch.long and batch.shape == (32,)
        assert 0 <= int(batch.min()) and int(batch.max()) < len(pids)
        groups = pids[batch].view(8, 4)
        assert len(set(groups[:, 0].tolist())) == 8  # P distinct identities
        assert (groups == groups[:, :1]).all()  # K consecutive images of each
        for row in batch.view(8, 4):
            n = COUNTS[int(pids[row[0]])]
            # no repeated image unless the identity has fewer than K
            assert len(set(row.tolist())) == min(n, 4)


def test_coverage_every_identity_each_epoch():
    pids = make_pids(COUNTS)
    sampler = PKSampler(pids, p=8, k=4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = Counter(int(pids[b[i]]) for b in sampler for i in range(0, len(b), 4))
        assert set(seen) == set(COUNTS)
        # 40 slots for 37 ids: three ids fill up the last batch a second time
        assert sum(seen.values()) == 40 and max(seen.values()) <= 2


def test_exact_multiple_of_p_visits_each_identity_once():
    pids = make_pids({i: 5 for i in range(12)})
    seen = Counter(int(pids[b[0::2]].unique().numel()) for b in PKSampler(pids, p=4, k=2))
    all_ids = Counter(int(pids[i]) for b in PKSampler(pids, p=4, k=2) for i in b[0::2])
    assert seen == {4: 3} and set(all_ids.values()) == {1}


def test_deterministic_per_seed_and_epoch():
    pids = make_pids(COUNTS)
    a = PKSampler(pids, p=4, k=4, seed=7)
    b = PKSampler(pids.tolist(), p=4, k=4, seed=7)
    first = batches(a)
    assert all(torch.equal(x, y) for x, y in zip(first, batches(b)))  # list or tensor, same batches
    # a second pass in the same epoch draws fresh batches; set_epoch replays the first pass
    assert not all(torch.equal(x, y) for x, y in zip(first, batches(a)))
    a.set_epoch(0)
    assert all(torch.equal(x, y) for x, y in zip(first, batches(a)))
    a.set_epoch(1)
    second = batches(a)
    assert not all(torch.equal(x, y) for x, y in zip(first, second))
    b.set_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(second, batches(b)))
    other = batches(PKSampler(pids, p=4, k=4, seed=8))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_small_identities_use_every_image():
    pids = torch.tensor([0, 1, 1, 2, 2, 2])
    for batch in PKSampler(pids, p=3, k=4):
        rows = batch.view(3, 4)
        for row in rows:
            own = (pids == pids[row[0]]).nonzero().flatten().tolist()
            assert set(row.tolist()) == set(own)


def test_too_few_identities():
    with pytest.raises(ReIDBenchError, match=r"at least p=16 identities, the training set has 3; lower p"):
        PKSampler(torch.tensor([0, 0, 1, 2]), p=16, k=4)
    with pytest.raises(ReIDBenchError, match="p >= 1 and k >= 1"):
        PKSampler(torch.tensor([0, 1]), p=1, k=0)


def test_works_as_dataloader_batch_sampler():
    pids = make_pids(COUNTS)
    dataset = torch.utils.data.TensorDataset(pids)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=PKSampler(pids, p=4, k=2))
    (first,) = next(iter(loader))
    assert first.shape == (8,) and first.view(4, 2).unique().numel() == 4


def test_modality_balanced_batches_split_each_identity_between_modalities():
    # ids 0-5 in both modalities (one with a single infrared image), ids 6-7 visible only
    pids, modality = [], []
    for pid in range(8):
        infrared = 0 if pid >= 6 else (1 if pid == 0 else 3)
        pids += [pid] * (5 + infrared)
        modality += [0] * 5 + [1] * infrared
    pids, modality = torch.tensor(pids), torch.tensor(modality)
    sampler = PKSampler(pids, p=4, k=4, seed=1, modality=modality)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for row in batch.view(4, 4):
                pid = int(pids[row[0]])
                assert (pids[row] == pid).all()
                expected = [0, 0, 0, 0] if pid >= 6 else [0, 0, 1, 1]
                assert modality[row].tolist() == expected


def test_modality_labels_must_match_the_ids():
    with pytest.raises(ReIDBenchError, match="one modality label per image"):
        PKSampler(torch.arange(8), p=2, k=2, modality=torch.zeros(5))
