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


@ATTACKS.register("m-fgsm")
class MetricFGSM(MetricIFGSM):
    """Metric FGSM (Bai et al. 2019): a single step of size ε along the sign of the gradient
    of the same-identity-guide loss of :class:`MetricIFGSM` (mean squared distance to the
    cross-camera same-identity gallery images), then the clip to [0, 1].

    FGSM is one step of the whole budget, so the protocol's step size and iteration count do
    not apply: whatever is passed, the attack runs ``step = eps`` and ``iterations = 1``, and
    :meth:`describe` records those values (what was actually run), as in the reference code
    (``x + ε·sign(∇)``, clipped to [0, 1]).
    """

    sweepable = False  # one step of the whole ε: more iterations are another attack (I-FGSM)

    def __init__(self, eps, step, iterations, seed=0, **params):
        super().__init__(eps, step, iterations, seed, **params)
        self.step, self.iterations = self.eps, 1


@ATTACKS.register("m-mifgsm")
class MetricMIFGSM(MetricIFGSM):
    """Metric MI-FGSM (Bai et al. 2019, after Dong et al. CVPR 2018): the loss and guides of
    :class:`MetricIFGSM` with momentum 1; each step's gradient is divided by its per-image
    mean absolute value before it is accumulated and the step follows the sign of the
    accumulated gradient (the shared loop does this whenever ``momentum > 0``), exactly as
    the reference ``MI_FGSM`` with ``momentum=1``. No random start.
    """

    momentum = 1.0


@ATTACKS.register("m-ifgsm-gallery")
class MetricIFGSMGallery(MetricIFGSM):
    """Bai et al.'s original setting: metric I-FGSM on the GALLERY, guided by the clean
    queries of the same identity (Bai et al. 2019; reference ``Gen_Adv.py`` perturbs every
    gallery identity with all the queries of that identity as guides).

    The runner calls a ``perturbs = "gallery"`` attack with the roles swapped: the images
    passed in are gallery images, ``ctx.query_*`` describe those gallery images and
    ``ctx.gallery_*`` the clean queries. The loss is therefore the very same as
    :class:`MetricIFGSM` (ascend the mean squared distance to the same-identity guides, here
    queries). By default the guides are the cross-camera queries, the only query-gallery
    pairs that count under the Market protocol; ``guides_same_camera=True`` gives the
    reference's guide set (every query of the identity, whatever its camera).

    One difference from :class:`MetricIFGSM`: an image without any guide (Market distractors,
    pid 0, which no query shows) is left unperturbed -- its loss is multiplied by 0, so its
    gradient is exactly 0 -- as the reference leaves the distractor and junk folders clean,
    instead of falling back to pushing away from its own clean feature.
    """

    perturbs = "gallery"

    def prepare(self, model, queries, ctx):
        ctx = super().prepare(model, queries, ctx)
        has_guide = ctx.same_identity_mask(not self.params["guides_same_camera"]).any(1)
        ctx.extra["has_guide"] = has_guide.to(queries.device, torch.float32)
        return ctx

    def loss(self, feats, ctx):
        return super().loss(feats, ctx) * ctx.extra["has_guide"]
