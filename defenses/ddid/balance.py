"""DDID's data balancing: which images to generate, and which generated images to keep.

The paper's resampling (Zhou et al. 2026, "Data Balancing" phase) has two rules, applied to
the real training images:

* Inter-identity fairness: every identity with fewer than δ1 images gets δ1 − n_i images
  from the identity-conditional diffusion model. δ1 is ``min_images`` when given, else the
  ``target_quantile`` of the per-identity image counts (the paper's value of δ1 is not in
  the text we could read; the quantile is our parametrisation). Which camera a top-up image
  is generated for the rule leaves open: ``topup_cameras: none`` (default, the rule as
  written) samples it with the null camera condition and gives it camid ``NO_CAMERA``;
  ``fill`` (our variant) water-fills the identity's cameras instead (each next image to
  the camera with the fewest images of it so far, ties at random).
* Intra-identity diversity: an identity whose most frequent camera c* holds more than δ2
  (``camera_share``) of its images gets one image for every other camera c ∈ C ∖ {c*}, C
  all cameras of the training set (``unseen_cameras: false``, an ablation, restricts C to
  the identity's own cameras). ``camera_share: 1`` turns the rule off; it needs camera
  labels. The default δ2 = 0.5 is ours (the value is not in the text we could read).
* Dedupe (our addition, off by default: ``oversample: 1``): every planned image is sampled
  ``oversample`` times and the candidate kept is the one farthest from the identity's real
  images and its already kept generated ones (greedy max-min, i.e. farthest-point
  selection), in a thumbnail feature space (the image at 16×8, centred, L2-normalised).
  There is no trained ReID model yet at this stage, and the thumbnail distance catches what
  dedupe is for: near-copies of a real image or of another sample.
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
    """The images to generate: one (pid, camid) per image; ``target`` is δ1, the per-identity
    count the top-up reaches, and ``diversify`` how many of the images (the last ones) the
    camera-diversity rule adds."""

    pids: torch.Tensor
    camids: torch.Tensor
    target: int
    diversify: int = 0

    def __len__(self) -> int:
        return len(self.pids)


TOPUP_CAMERAS = ("none", "fill")


def check_balance_options(target_quantile: float, min_images, camera_share: float, topup_cameras: str) -> None:
    """One clear line for each balancing option out of range."""
    if not 0 < target_quantile <= 1:
        raise ReIDBenchError(f"defense 'ddid': target_quantile must be in (0, 1], got {target_quantile}")
    if min_images is not None and (isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 1):
        raise ReIDBenchError(f"defense 'ddid': min_images must be a positive integer or null, got {min_images!r}")
    if not 0 < camera_share <= 1:
        raise ReIDBenchError(f"defense 'ddid': camera_share must be in (0, 1] (1: no camera rule), got {camera_share}")
    if topup_cameras not in TOPUP_CAMERAS:
        raise ReIDBenchError(f"defense 'ddid': topup_cameras must be one of {', '.join(TOPUP_CAMERAS)}, "
                             f"got {topup_cameras!r}")


def plan_balance(pids: torch.Tensor, camids: torch.Tensor, target_quantile: float = 1.0, use_cameras: bool = True,
                 unseen_cameras: bool = True, generator: torch.Generator | None = None, min_images: int | None = None,
                 camera_share: float = 0.5, topup_cameras: str = "none") -> BalancePlan:
    """The balancing plan of the module docstring: the top-up images of every identity, then
    the camera-diversity images. Without ``use_cameras`` there is no camera rule and every
    generated image has camid ``NO_CAMERA``."""
    check_balance_options(target_quantile, min_images, camera_share, topup_cameras)
    generator = generator or torch.Generator().manual_seed(0)
    pids, camids = torch.as_tensor(pids).long(), torch.as_tensor(camids).long()
    ids, counts = torch.unique(pids, return_counts=True)
    if min_images is None:
        target = int(math.ceil(float(torch.quantile(counts.double(), target_quantile))))
    else:
        target = int(min_images)
    all_cameras = torch.unique(camids)
    topup_pids, topup_cams, extra_pids, extra_cams = [], [], [], []
    for pid, count in zip(ids.tolist(), counts.tolist()):
        own = camids[pids == pid]
        candidates = all_cameras if unseen_cameras else torch.unique(own)
        need = max(target - count, 0)
        topup_pids += [pid] * need
        if use_cameras and topup_cameras == "fill":
            topup_cams += _water_fill(own, candidates, need, generator)
        else:
            topup_cams += [NO_CAMERA] * need
        if not use_cameras:
            continue
        seen, per_camera = torch.unique(own, return_counts=True)
        if int(per_camera.max()) / count > camera_share:
            dominant = int(seen[per_camera.argmax()])
            others = [int(c) for c in candidates if int(c) != dominant]
            extra_pids += [pid] * len(others)
            extra_cams += others
    return BalancePlan(torch.tensor(topup_pids + extra_pids, dtype=torch.long),
                       torch.tensor(topup_cams + extra_cams, dtype=torch.long), target, len(extra_pids))


def _water_fill(own: torch.Tensor, candidates: torch.Tensor, need: int, generator: torch.Generator) -> list[int]:
    """``need`` cameras, each the candidate with the fewest images of the identity so far."""
    # Random order first, then a stable argmin: ties go to a random camera.
    candidates = candidates[torch.randperm(len(candidates), generator=generator)]
    filled = (own.view(-1, 1) == candidates.view(1, -1)).sum(0)
    chosen = []
    for _ in range(need):
        j = int(torch.argmin(filled))
        filled[j] += 1
        chosen.append(int(candidates[j]))
    return chosen


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
