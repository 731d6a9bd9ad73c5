"""Metric attacks of Bouniot et al., "Vulnerability of Person Re-Identification Models to
Metric Adversarial Attacks" (CVPR Workshops 2020; reference code CEA-LIST/adv-reid).

The paper sorts attacks by the guides they use: one same-identity image (single guide,
SG), every same-identity image (multi guide, MG), the image itself (self metric attack,
SMA) and same-identity images plus the prototype of the furthest identity (furthest
negative attack, FNA). All are L∞ I-FGSM (``advertorch.attacks.LinfPGDAttack``,
untargeted: the loss is ascended) on the squared Euclidean distance between features.

Differences from the reference that hold for every attack here:

* Guides. The reference draws its guides from the *query* set (the other queries of the
  identity), so that the attacker never sees the gallery. Here the guides are the clean
  features of the cross-camera same-identity *gallery* images (``ctx.same_identity_mask()``),
  the matches that count under the Market protocol, and FNA's prototypes are means of
  gallery features; the attack context of this benchmark grants the gallery features, and
  only the current batch of queries is visible to an attack. ``guides_same_camera=True``
  adds the same-camera gallery images to the guides.
* Clipping. The reference clips the adversarial batch to the batch's own pixel range
  (``clip_min/clip_max = batch.min()/max()``) rather than to [0, 1]; here it is [0, 1] (the
  attack contract). That quirk is not exposed: it would make an image's result depend on the
  other images of its batch.
* Features are the protocol's L2-normalised embeddings (the reference's default uses raw
  features unless ``--cosine``).
* The reference sums its losses over guides (``MSELoss(reduction='sum')``); the sum is kept
  where it weighs one term against another (MG with ``include_self``, FNA), and terms that are
  constant in the perturbation are dropped (they do not change the gradient).
"""

from __future__ import annotations

import torch

from reidbench.registry import ATTACKS

from .iterative import IterativeMetricAttack
from .metric_fgsm import MetricIFGSM, guide_centroids


@ATTACKS.register("sg-ifgsm")
class SingleGuideIFGSM(MetricIFGSM):
    """Single-guide metric I-FGSM (Bouniot et al. 2020, "SG"): ascend the squared distance
    between the adversarial feature and the clean feature of ONE same-identity image.

    Guide: one of the query's cross-camera same-identity gallery images, drawn uniformly at
    random from ``ctx.generator`` (once per attack, before the loop), as the reference draws
    one random same-identity image (``np.random.randint``) other than the query itself (its
    ``perturb_queries_naive``, used for ``--single``; it draws among the other *queries* and
    loops forever on an identity with a single query -- here the gallery never contains the
    query itself). A query without any guide falls back to its own clean feature, as
    ``m-ifgsm`` does. No random start, no momentum (``LinfPGDAttack(rand_init=False)``).
    """

    random_draws = True  # the guide: a restart draws another one

    def prepare(self, model, queries, ctx):
        mask = ctx.same_identity_mask(exclude_same_camera=not self.params["guides_same_camera"])
        draw = torch.rand(mask.shape, generator=ctx.generator).masked_fill_(~mask.cpu(), -1.0)
        chosen = draw.argmax(1).to(ctx.gallery_feats.device)
        guides = torch.where(mask.any(1).view(-1, 1), ctx.gallery_feats[chosen], ctx.query_feats)
        ctx.extra["guide_index"] = torch.where(mask.any(1).cpu(), chosen.cpu(), torch.full_like(chosen.cpu(), -1))
        ctx.extra["guides"] = guides.to(queries.device)
        return ctx


@ATTACKS.register("mg-ifgsm")
class MultiGuideIFGSM(IterativeMetricAttack):
    """Multi-guide metric I-FGSM (Bouniot et al. 2020, "MG"): ascend the SUM of squared
    distances between the adversarial feature and the clean features of every same-identity
    image (here: every cross-camera same-identity gallery image; ``guides_same_camera=True``
    adds the same-camera ones). No random start, no momentum.

    With these guides and ``include_self=False`` the gradient has the direction of Bai et al.'s
    ``m-ifgsm`` loss (a sum and a mean over the same guides differ by a positive factor per
    query), so the two attacks coincide under the sign step; they differ in the papers by
    where the guides come from (Bai: gallery perturbed with query guides; Bouniot: queries
    guided by other queries).

    Reference quirk (``perturb_queries``): the guide set is built from the query set, so it
    contains the attacked image itself, and every set is padded with copies of the image's own
    clean feature up to the size of the largest identity's set, so the image's own feature
    weighs ``1 + max_n - n`` in the sum (``n`` guides, ``max_n`` the largest set). That adds a
    hidden self-metric (SMA-like) term. Default: no self term (the paper's intent, guides are
    other images of the identity); ``include_self=True`` restores the reference's weighting,
    with ``max_n`` the largest guide set of the batch (the reference's is over the whole query
    set, which an attack does not see here; the gallery's largest group cannot stand in for
    it, as Market's thousands of distractors share pid 0). With it, a query's result depends
    on the other queries of its batch, as the reference's depends on the query set.
    A query without any guide falls back to its own clean feature (as ``m-ifgsm``).
    """

    def __init__(self, eps, step, iterations, seed=0, guides_same_camera: bool = False, include_self: bool = False,
                 **params):
        super().__init__(eps, step, iterations, seed, guides_same_camera=guides_same_camera,
                         include_self=include_self, **params)

    def prepare(self, model, queries, ctx):
        exclude_same_camera = not self.params["guides_same_camera"]
        centroids, has_guide = guide_centroids(ctx, exclude_same_camera)
        counts = ctx.same_identity_mask(exclude_same_camera).sum(1).to(centroids.dtype)
        own = ctx.query_feats.to(centroids.device)
        # Without guides, push away from the own clean feature, weight 1 (as m-ifgsm).
        ctx.extra["guides"] = torch.where(has_guide.view(-1, 1), centroids, own).to(queries.device)
        ctx.extra["guide_counts"] = counts.clamp_min(1).to(queries.device)
        if self.params["include_self"]:
            self_weight = 1.0 + (counts.max() - counts)
        else:
            self_weight = torch.zeros_like(counts)
        ctx.extra["self_weight"] = self_weight.to(queries.device)
        ctx.extra["clean"] = own.to(queries.device)
        return ctx

    def loss(self, feats, ctx):
        # sum_g |f - g|^2 = n (|f|^2 - 2 f.c) + const, c the guides' centroid.
        push = ctx.extra["guide_counts"] * (feats.pow(2).sum(1) - 2.0 * (feats * ctx.extra["guides"]).sum(1))
        return push + ctx.extra["self_weight"] * (feats - ctx.extra["clean"]).pow(2).sum(1)


@ATTACKS.register("sma")
class SelfMetricAttack(IterativeMetricAttack):
    """Self metric attack (Bouniot et al. 2020, "SMA"): ascend the squared distance between
    the adversarial feature and the image's own clean feature ``ctx.query_feats``; no other
    image is needed. The gradient of that loss is 0 at δ = 0, so the attack starts at a point
    drawn uniformly in the ε-ball (from ``ctx.generator``, then clipped to [0, 1]), as the
    reference's ``LinfPGDAttack(rand_init=True)``. No momentum.
    """

    random_start = True
    uses_identity = False

    def prepare(self, model, queries, ctx):
        ctx.extra["clean"] = ctx.query_feats.to(queries.device)
        return ctx

    def loss(self, feats, ctx):
        return (feats - ctx.extra["clean"]).pow(2).sum(1)


@ATTACKS.register("fna")
class FurthestNegativeAttack(MultiGuideIFGSM):
    """Furthest-negative attack (Bouniot et al. 2020, "FNA"): push the adversarial feature
    away from every same-identity guide and pull it toward the prototype of the identity
    furthest from the query. No random start, no momentum (the reference's ``FNA``).

    * Push guides: as :class:`MultiGuideIFGSM` (cross-camera same-identity gallery images,
      summed; ``include_self`` restores the reference's self-padding, see there).
    * Prototypes: the mean clean feature of each identity, computed like the reference
      (``perturb_queries_hardest_multi``: plain mean, not re-normalised) but over the gallery
      (the reference uses the query set); every gallery pid except the query's own (and junk,
      pid -1) is a candidate -- Market distractors (pid 0) form one such group, whose mean has
      a small norm and so is practically never the furthest.
    * Furthest: the prototype at the largest Euclidean distance from the query's CLEAN feature
      ``ctx.query_feats`` (chosen once, before the loop; ties go to the smallest pid).
    * Loss (ascended): ``sum_g |f - g|^2 - |f - p|^2``: the pushes are summed over the guides and
      the pull has weight 1, as the reference's ``max_min_mse``.
    """

    def prepare(self, model, queries, ctx):
        ctx = super().prepare(model, queries, ctx)
        keep = ctx.gallery_pids != -1
        pids, inverse = torch.unique(ctx.gallery_pids[keep], return_inverse=True)
        feats = ctx.gallery_feats[keep.to(ctx.gallery_feats.device)]
        sums = torch.zeros(len(pids), feats.shape[1], dtype=feats.dtype, device=feats.device)
        sums.index_add_(0, inverse.to(feats.device), feats)
        counts = torch.bincount(inverse, minlength=len(pids)).to(feats.dtype).to(feats.device)
        prototypes = sums / counts.clamp_min(1).view(-1, 1)
        dist = torch.cdist(ctx.query_feats.to(prototypes.device), prototypes)
        own = ctx.query_pids.view(-1, 1).to(pids.device) == pids.view(1, -1)
        dist = dist.masked_fill(own.to(dist.device), -float("inf"))
        furthest = dist.argmax(1)
        has_negative = (~own).any(1)
        ctx.extra["prototype_pid"] = torch.where(has_negative, pids[furthest.cpu()], torch.full_like(pids[:1], -1))
        ctx.extra["prototype"] = prototypes[furthest].to(queries.device)
        ctx.extra["pull_weight"] = has_negative.to(queries.device, torch.float32)
        return ctx

    def loss(self, feats, ctx):
        pull = (feats - ctx.extra["prototype"]).pow(2).sum(1)
        return super().loss(feats, ctx) - ctx.extra["pull_weight"] * pull
