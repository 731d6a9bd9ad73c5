"""The standard ReID losses (Luo et al., "Bag of Tricks", CVPRW 2019)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def cross_entropy_label_smoothing(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Cross-entropy with label smoothing (Szegedy et al., CVPR 2016)."""
    return F.cross_entropy(logits, targets, label_smoothing=epsilon)


def batch_hard_triplet(
    features: torch.Tensor, pids: torch.Tensor, margin: Optional[float] = 0.3, normalize: bool = False
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017): per anchor, the farthest positive and the
    closest negative in the batch. ``margin=None`` gives the soft-margin variant log(1 + e^x)."""
    if normalize:
        features = F.normalize(features, dim=1)
    dist = torch.cdist(features, features).clamp(min=1e-12)
    same = pids.unsqueeze(0) == pids.unsqueeze(1)
    hardest_pos = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(dim=1)
    valid = torch.isfinite(hardest_pos) & torch.isfinite(hardest_neg)
    if not valid.any():
        return features.sum() * 0.0
    gap = hardest_pos[valid] - hardest_neg[valid]
    if margin is None:
        return F.softplus(gap).mean()
    return F.relu(gap + margin).mean()


def reid_loss(model, images: torch.Tensor, pids: torch.Tensor, recipe) -> tuple[torch.Tensor, dict]:
    """The standard objective: label-smoothed cross-entropy on the BNNeck logits plus
    batch-hard triplet on the pre-neck features. ``pids`` are contiguous training labels."""
    logits, features = model(images)
    return reid_objective(logits, features, pids, recipe)


def reid_objective(logits: Optional[torch.Tensor], features: torch.Tensor, pids: torch.Tensor,
                   recipe) -> tuple[torch.Tensor, dict]:
    """:func:`reid_loss` on the outputs of a training-mode forward pass."""
    triplet = batch_hard_triplet(features, pids, recipe.triplet_margin)
    loss = recipe.triplet_weight * triplet
    logs = {"triplet": float(triplet.detach())}
    if logits is not None and recipe.ce_weight > 0:
        ce = cross_entropy_label_smoothing(logits, pids, recipe.label_smoothing)
        loss = loss + recipe.ce_weight * ce
        logs["ce"] = float(ce.detach())
        logs["acc"] = float((logits.detach().argmax(1) == pids).float().mean())
    return loss, logs
