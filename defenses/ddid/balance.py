"""DDID's data balancing: which images to generate, and which generated images to keep.

* Fairness across identities: every identity is topped up to ``target`` images, the
  ``target_quantile`` of the per-identity image counts (1.0: the largest identity).
* Diversity within an identity: its new images are spread over cameras by water-filling
  (each next image goes to the camera where the identity has the fewest images so far, ties
  at random); with ``unseen_cameras`` the identity's candidate cameras are all cameras of the
  training set, so the cameras it was never seen by are filled first.
* Dedupe: every planned image is sampled ``oversample`` times; the candidate kept is the one
  farthest from the identity's real images and its already kept generated ones (greedy
  max-min, i.e. farthest-point selection), in a thumbnail feature space (the image at
  16×8, centred, L2-normalised). There is no trained ReID model yet at this stage, and the
  thumbnail distance catches what dedupe is for: near-copies of a real image or of another
  sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reidbench.errors import ReIDBenchError

#: camid of a generated image when cameras are not used (unknown camera)
NO_CAMERA = -1


def has_camera_labels(camids: torch.Tensor) -> bool:
    """True when the training set says which camera took each image: every camid >= 0 and at
    least two cameras (one camera carries no camera information)."""
    camids = torch.as_tensor(camids)
    return bool((camids >= 0).all()) and int(torch.unique(camids).numel()) >= 2


@dataclass
class BalancePlan:
    """The images to generate: one (pid, camid) per image; ``target`` is the per-identity count."""

    pids: torch.Tensor
    camids: torch.Tensor
    target: int

    def __len__(self) -> int:
        return len(self.pids)


def plan_balance(pids: torch.Tensor, camids: torch.Tensor, target_quantile: float = 1.0, use_cameras: bool = True,
                 unseen_cameras: bool = True, generator: torch.Generator | None = None) -> BalancePlan:
    """The balancing plan of the module docstring. Without ``use_cameras`` every generated
    image has camid ``NO_CAMERA``."""
    if not 0 < target_quantile <= 1:
        raise ReIDBenchError(f"defense 'ddid': target_quantile must be in (0, 1], got {target_quantile}")
    generator = generator or torch.Generator().manual_seed(0)
    pids, camids = torch.as_tensor(pids).long(), torch.as_tensor(camids).long()
    ids, counts = torch.unique(pids, return_counts=True)
    target = int(math.ceil(float(torch.quantile(counts.double(), target_quantile))))
    all_cameras = torch.unique(camids)
    out_pids, out_cams = [], []
    for pid, count in zip(ids.tolist(), counts.tolist()):
        need = target - count
        if need <= 0:
            continue
        if not use_cameras:
            out_pids += [pid] * need
            out_cams += [NO_CAMERA] * need
            continue
        own = camids[pids == pid]
        candidates = all_cameras if unseen_cameras else torch.unique(own)
        # Random order first, then a stable argmin: ties go to a random camera.
        candidates = candidates[torch.randperm(len(candidates), generator=generator)]
        filled = (own.view(-1, 1) == candidates.view(1, -1)).sum(0)
        for _ in range(need):
            j = int(torch.argmin(filled))
            filled[j] += 1
            out_pids.append(pid)
            out_cams.append(int(candidates[j]))
    return BalancePlan(torch.tensor(out_pids, dtype=torch.long), torch.tensor(out_cams, dtype=torch.long), target)


def thumbnail_features(images: torch.Tensor, size: tuple[int, int] = (16, 8)) -> torch.Tensor:
    """(N, D) centred, L2-normalised thumbnails of images in [0, 1] (or uint8)."""
    x = F.adaptive_avg_pool2d(images.float(), size).flatten(1)
    return F.normalize(x - x.mean(1, keepdim=True), dim=1)


def select_diverse(candidates: torch.Tensor, slots: torch.Tensor, groups: torch.Tensor,
                   references: dict[int, torch.Tensor]) -> torch.Tensor:
    """One candidate per slot, greedily the farthest from its group's references and the
    candidates already kept for that group.

    ``candidates`` (M, D) features; ``slots[i]`` the planned image candidate i stands for
    (0..S-1, every slot has at least one); ``groups[s]`` the identity of slot s;
    ``references[g]`` (R, D) features of identity g's real images. Returns S candidate indices.
    """
    chosen = torch.empty(len(groups), dtype=torch.long)
    kept: dict[int, list[torch.Tensor]] = {}
    for slot in range(len(groups)):
        index = torch.nonzero(slots == slot).flatten()
        group = int(groups[slot])
        ref = torch.cat([references.get(group, candidates[:0])] + kept.get(group, []))
        if len(ref) == 0 or len(index) == 1:
            best = index[0]
        else:
            best = index[torch.cdist(candidates[index], ref).amin(1).argmax()]
        chosen[slot] = best
        kept.setdefault(group, []).append(candidates[best].unsqueeze(0))
    return chosen
