"""Metric FGSM-family attacks of Bai et al., "Adversarial Metric Attack and Defense for
Person Re-identification" (TPAMI 2020, arXiv:1901.10650)."""

from __future__ import annotations

import torch

from reidbench.attack import AttackContext
from reidbench.registry import ATTACKS

from .iterative import IterativeMetricAttack


def guide_centroids(ctx: AttackContext, exclude_same_camera: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean clean feature of each query's same-identity gallery images, and whether one exists.

    For L2-normalised features, the mean squared distance to a set of guides equals
    ``1 - 2 f·c + mean|g|²`` with ``c`` their centroid, so the centroid carries the whole
    gradient of Bai's loss at a fraction of the cost.
    """
    mask = ctx.same_identity_mask(exclude_same_camera).float()
    counts = mask.sum(1, keepdim=True)
    centroids = (mask @ ctx.gallery_feats) / counts.clamp_min(1)
    return centroids, counts.squeeze(1) > 0


@ATTACKS.register("m-ifgsm")
class MetricIFGSM(IterativeMetricAttack):
    """Metric I-FGSM (Bai et al. 2019): ascend the mean squared distance between the
    adversarial query's feature and the clean features of its same-identity gallery images
    (the guides), so that its true matches fall down the ranking.

    ``guides_same_camera=False`` (default) takes only the cross-camera gallery matches, the
    ones that count under the Market protocol; queries without any guide fall back to
    pushing away from their own clean feature.
    """

    def __init__(self, eps, step, iterations, seed=0, guides_same_camera: bool = False, **params):
        super().__init__(eps, step, iterations, seed, guides_same_camera=guides_same_camera, **params)

    def prepare(self, model, queries, ctx):
        centroids, has_guide = guide_centroids(ctx, exclude_same_camera=not self.params["guides_same_camera"])
        centroids = torch.where(has_guide.view(-1, 1), centroids, ctx.query_feats)
        ctx.extra["guides"] = centroids.to(queries.device)
        return ctx

    def loss(self, feats, ctx):
        return feats.pow(2).sum(1) - 2.0 * (feats * ctx.extra["guides"]).sum(1)
