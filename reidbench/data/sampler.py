"""P x K identity sampling for metric-learning losses (batch-hard triplet and friends).

Each batch holds P distinct identities with K images each, the sampling of Hermans et al.,
"In Defense of the Triplet Loss for Person Re-Identification" (2017), used for training on
Market-1501 (Zheng et al., ICCV 2015), MSMT17 (Wei et al., CVPR 2018) and CUHK03-NP
(Zhong et al., 2017).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import ReIDBenchError

__all__ = ["PKSampler"]


class PKSampler:
    """An iterable of index batches: LongTensors of ``p * k`` dataset indices.

    A batch is ``p`` distinct identities, each contributing ``k`` consecutive entries (identity-
    major order, so ``batch.view(p, k)`` groups them). An identity with at least ``k`` images
    gives ``k`` different ones; one with fewer gives all of its images once, topped up with
    draws with replacement, so no image is wasted.

    An epoch visits the identities in a random order, ``p`` at a time; the last batch is filled
    up with other identities, so every identity appears at least once and ``len(sampler) =
    ceil(num_ids / p)``. The batches depend only on ``(seed, epoch)`` and on how many passes
    over the sampler were started since :meth:`set_epoch`: the first pass after
    ``set_epoch(e)`` is always the same, and a further pass in the same epoch (a training loop
    that needs more iterations than one pass gives) draws fresh batches instead of repeating.

    With ``modality`` (0 visible, 1 infrared per entry), an identity filmed in both modalities
    gives ``ceil(k/2)`` visible and ``floor(k/2)`` infrared entries, each half drawn as above
    within its modality: the cross-modality batch of visible-infrared ReID (Ye et al., AGW,
    TPAMI 2021; Zhu et al.'s hetero-centre loss, 2020), without which a batch may hold an
    identity in one modality only and no loss term ever links the two. An identity seen in one
    modality is drawn as without ``modality``.

    Usable as ``DataLoader(dataset, batch_sampler=PKSampler(...))``.
    """

    def __init__(self, pids: Sequence[int] | torch.Tensor | np.ndarray, p: int = 16, k: int = 4, seed: int = 0,
                 modality: Sequence[int] | torch.Tensor | np.ndarray | None = None):
        if int(p) < 1 or int(k) < 1:
            raise ReIDBenchError(f"PKSampler needs p >= 1 and k >= 1, got p={p}, k={k}")
        if int(seed) < 0:
            raise ReIDBenchError(f"PKSampler needs a non-negative seed, got {seed}")
        pids = torch.as_tensor(pids).long().numpy() if not isinstance(pids, np.ndarray) else pids.astype(np.int64)
        if pids.ndim != 1:
            raise ReIDBenchError(f"PKSampler needs one person id per image, got an array of shape {pids.shape}")
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.epoch = 0
        self._pass = 0
        # A stable sort keeps each identity's indices in dataset order, so the index groups (and
        # hence the batches) do not depend on the sort algorithm.
        order = np.argsort(pids, kind="stable")
        ids, starts = np.unique(pids[order], return_index=True)
        self.ids = ids
        self._groups = np.split(order, starts[1:]) if len(order) else []
        self._halves: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self._groups)
        if modality is not None:
            modality = np.asarray(torch.as_tensor(modality).long().numpy())
            if modality.shape != pids.shape:
                raise ReIDBenchError(f"PKSampler needs one modality label per image: {modality.shape} labels "
                                     f"for {pids.shape} ids")
            for i, group in enumerate(self._groups):
                visible, infrared = group[modality[group] == 0], group[modality[group] == 1]
                if len(visible) and len(infrared):
                    self._halves[i] = (visible, infrared)
        if len(ids) < self.p:
            raise ReIDBenchError(
                f"PKSampler needs at least p={self.p} identities, the training set has {len(ids)}; lower p"
            )

    @property
    def num_ids(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields (its first pass)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)
        self._pass = 0

    def __len__(self) -> int:
        return math.ceil(self.num_ids / self.p)

    def _draw(self, rng: np.random.Generator, group: np.ndarray, k: int) -> np.ndarray:
        if len(group) >= k:
            return rng.choice(group, size=k, replace=False)
        extra = rng.choice(group, size=k - len(group), replace=True)
        return np.concatenate([rng.permutation(group), extra])

    def _draw_identity(self, rng: np.random.Generator, i: int) -> np.ndarray:
        if self._halves[i] is None:
            return self._draw(rng, self._groups[i], self.k)
        visible, infrared = self._halves[i]
        half = (self.k + 1) // 2
        return np.concatenate([self._draw(rng, visible, half), self._draw(rng, infrared, self.k - half)])

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Seeding with the tuple keeps epochs (and passes) independent streams, not shifted
        # copies of one; pass 0 keeps the plain (seed, epoch) key.
        key = [self.seed, self.epoch] + ([self._pass] if self._pass else [])
        self._pass += 1
        rng = np.random.default_rng(key)
        order = rng.permutation(self.num_ids)
        for start in range(0, self.num_ids, self.p):
            chosen = order[start : start + self.p]
            if len(chosen) < self.p:
                others = np.setdiff1d(np.arange(self.num_ids), chosen)
                chosen = np.concatenate([chosen, rng.choice(others, size=self.p - len(chosen), replace=False)])
            batch = np.concatenate([self._draw_identity(rng, i) for i in chosen])
            yield torch.from_numpy(batch.astype(np.int64))
