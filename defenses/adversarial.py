"""Adversarial training on the metric: ``at`` and GOAT (``goat``, ``goat-sma``, ``goat-fna``,
and ``goat-ce``).

Both replace (part of) every training batch with adversarial examples of the current model.
``at`` trains on them with the shared loss (label-smoothed cross-entropy + batch-hard
triplet); GOAT, as the reference code trains it (``train.py --triplet --adv``), with a
triplet loss alone (below). The inner attack is projected sign-gradient ascent on a feature-space loss, i.e.
the attack loop of :mod:`attacks.iterative`, with guides taken from the clean training
batch (no gallery exists at training time). Features are the protocol's L2-normalised
embeddings, so the inner attack maximises what evaluation measures.

* ``at`` (Madry et al., ICLR 2018, on the metric as Bai et al., 2019, §5): PGD with a random
  start on the metric I-FGSM objective (push away from the other same-identity images of the
  batch), ε = 5/255, step 1/255, 7 steps; a random ``adversarial_share`` = 50% of the batch
  is replaced by its adversarial version (Goodfellow et al.'s mixed objective with α = 0.5,
  at the cost of one batch). Bai et al. do not state their inner attack's step count or
  mixing ratio; these are ours.
* GOAT (Bouniot et al., "Vulnerability of person re-identification models to metric
  adversarial attacks", CVPRW 2020, §4): 100% adversarial batches, inner PGD ε = 5/255,
  step 1/255, 7 iterations, random start. Training loss as the reference's triplet model:
  no classifier term, a batch-hard margin ranking loss on the raw embedding (the pre-neck
  features, not L2-normalised): ``mean relu(d_ap − d_an + margin)`` over anchors, ``d_ap`` the
  farthest positive and ``d_an`` the nearest negative, Euclidean, ``margin = 10``
  (``nn.MarginRankingLoss(margin=10)`` on the reference's ``get_distances``);
  ``soft_margin=True`` is its ``--soft_margin`` option, ``softplus(d_ap − d_an)``. The model
  keeps its BNNeck and classifier (unused by this loss, so never trained), and is evaluated
  with the embedding its zoo entry names. ``loss="ce-triplet"`` trains with the shared loss
  instead; ``goat-ce`` is that variant of ``goat`` (what ``goat`` was before training
  version 2). Guides by variant: ``goat`` one random other
  same-identity batch image; ``goat-sma`` the image's own clean feature; ``goat-fna`` 4
  same-identity push guides and 1 pull guide, the farthest other-identity image of the
  batch (objective Σ_push |f − g|² − |f − g_pull|², the reference's ``sum_dif_mse``).

Two accidents of the reference code (CEA-LIST/adv-reid) are not the default and are
exposed as parameters:

* ``eps_space="normalized"``: the reference attacks already-normalised tensors, so its
  ε = 5/255 is in mean/std units (≈ 1.1/255 in pixels). Default ``"pixel"``: ε in [0, 1]
  pixel units, the budget the protocol attacks with.
* ``bn_mode="train"``: the reference runs the inner attack with the model in training
  mode, so each of its forwards uses and updates the batch-norm running statistics with
  adversarial batches. Default ``"eval"``: the inner attack sees the frozen statistics,
  which are left untouched.

The reference's FNA push guides are four draws with replacement from all of the
identity's images, which may be the image itself; here they are drawn with replacement
from the other same-identity images of the P×K batch (``include_self=True`` allows the
image itself), and the pull guide is required to be of another identity (the reference
takes the farthest batch image whatever its identity, harmless in its identity-shuffled
batches, wrong in P×K batches).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attacks.iterative import IterativeMetricAttack
from reidbench.attack import training_batch_context
from reidbench.defense import Defense
from reidbench.errors import ReIDBenchError
from reidbench.registry import DEFENSES
from reidbench.train.losses import batch_hard_triplet

GUIDES = ("intra", "sma", "fna")
GOAT_LOSSES = ("triplet", "ce-triplet")


class _BatchStatisticsFeatures(nn.Module):
    """The model kept in training mode (batch-norm batch statistics, running averages
    updated), returning the pre-neck features: the reference GOAT's inner attack."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True):  # the attack loop calls eval(); the mode stays fixed
        return self

    def forward(self, x):
        self.model.train()
        return self.model(x)[1]


class BatchGuidedPGD(IterativeMetricAttack):
    """The inner attack of adversarial training: PGD on a loss whose guides are the clean
    training batch's own features (``ctx.gallery_feats`` / ``ctx.gallery_pids`` is the whole
    batch; ``ctx.extra["rows"]`` says which of its images are the attacked queries)."""

    registry_name = "adversarial-training inner attack"

    def __init__(self, eps, step, iterations, seed=0, guides: str = "intra", random_start: bool = True,
                 push_guides: int = 4, include_self: bool = False):
        if guides not in GUIDES:
            raise ReIDBenchError(f"adversarial training: guides must be one of {GUIDES}, got '{guides}'")
        super().__init__(eps, step, iterations, seed, guides=guides, push_guides=int(push_guides),
                         include_self=bool(include_self))
        self.random_start = bool(random_start)

    def prepare(self, model, queries, ctx):
        feats, pids = ctx.gallery_feats, ctx.gallery_pids
        b = feats.shape[0]
        eye = torch.eye(b, dtype=torch.bool, device=feats.device)
        same = pids.view(-1, 1) == pids.view(1, -1)
        mode = self.params["guides"]
        rows = ctx.extra.get("rows", torch.arange(b, device=feats.device))
        if mode == "sma":
            ctx.extra["push"], ctx.extra["pull"] = feats[rows].unsqueeze(1), None
            return ctx
        candidates = same if self.params["include_self"] else same & ~eye
        # An identity alone in the batch has no other image: it pushes from its own feature.
        candidates = candidates | (~candidates.any(1, keepdim=True) & eye)
        count = 1 if mode == "intra" else self.params["push_guides"]
        weights = candidates.float().cpu()
        index = torch.multinomial(weights, count, replacement=True, generator=ctx.generator).to(feats.device)
        ctx.extra["push"] = feats[index][rows]  # (rows, count, D)
        if mode == "fna":
            dist = torch.cdist(feats, feats).masked_fill(same, float("-inf"))
            farthest = dist.argmax(1)
            has_negative = (~same).any(1)
            pull = torch.where(has_negative.view(-1, 1), feats[farthest], torch.zeros_like(feats))
            ctx.extra["pull"], ctx.extra["pull_weight"] = pull[rows], has_negative[rows].to(feats.dtype)
        else:
            ctx.extra["pull"] = None
        return ctx

    def loss(self, feats, ctx):
        push = (feats.unsqueeze(1) - ctx.extra["push"]).pow(2).sum(-1).sum(1)
        if ctx.extra["pull"] is None:
            return push
        return push - ctx.extra["pull_weight"] * (feats - ctx.extra["pull"]).pow(2).sum(1)


class AdversarialTraining(Defense):
    """Train on metric adversarial examples of the current model (see the module docstring)."""

    guides = "intra"
    default_share = 0.5
    default_push_guides = 1

    def __init__(self, eps_255: float = 5.0, step_255: float = 1.0, iterations: int = 7, random_start: bool = True,
                 adversarial_share: float | None = None, eps_space: str = "pixel", bn_mode: str = "eval",
                 push_guides: int | None = None, include_self: bool = False):
        share = self.default_share if adversarial_share is None else float(adversarial_share)
        push = self.default_push_guides if push_guides is None else int(push_guides)
        super().__init__(eps_255=eps_255, step_255=step_255, iterations=iterations, random_start=random_start,
                         adversarial_share=share, eps_space=eps_space, bn_mode=bn_mode, push_guides=push,
                         include_self=include_self)
        if not 0 < share <= 1:
            raise ReIDBenchError(f"defense '{self.registry_name}': adversarial_share must be in (0, 1], got {share}")
        if eps_space not in ("pixel", "normalized"):
            raise ReIDBenchError(f"defense '{self.registry_name}': eps_space must be 'pixel' or 'normalized', got '{eps_space}'")
        if bn_mode not in ("eval", "train"):
            raise ReIDBenchError(f"defense '{self.registry_name}': bn_mode must be 'eval' or 'train', got '{bn_mode}'")
        self.inner = BatchGuidedPGD(eps_255 / 255.0, step_255 / 255.0, iterations, guides=self.guides,
                                    random_start=random_start, push_guides=push, include_self=include_self)

    def _attack_for(self, model: nn.Module) -> BatchGuidedPGD:
        if self.params["eps_space"] == "pixel":
            return self.inner
        # ε and step in mean/std units are per-channel budgets of ε·σ_c in pixel units.
        std = getattr(model, "std", None)
        if std is None:
            raise ReIDBenchError(f"defense '{self.registry_name}': eps_space 'normalized' needs a model with a 'std' buffer")
        inner = BatchGuidedPGD(self.inner.eps, self.inner.step, self.inner.iterations, **self.inner.params,
                               random_start=self.inner.random_start)
        inner.eps = self.inner.eps * std.detach()
        inner.step = self.inner.step * std.detach()
        return inner

    def training_batch(self, model, batch, generator):
        images = batch.images
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        share = self.params["adversarial_share"]
        chosen = torch.arange(images.shape[0])
        if share < 1:
            chosen = torch.randperm(images.shape[0], generator=generator)[: max(1, round(share * images.shape[0]))]
        was_training = model.training
        model.eval()
        attacked = model if self.params["bn_mode"] == "eval" else _BatchStatisticsFeatures(model)
        chosen = chosen.to(images.device)
        # Guides are drawn from the whole batch; the attacked images are its ``rows``.
        ctx = training_batch_context(attacked, images, batch.pids, seed, rows=chosen)
        adversarial = self._attack_for(model)(attacked, images[chosen], ctx)
        model.train(was_training)
        out = images.clone()
        out[chosen] = adversarial.to(images.dtype)
        return out



@DEFENSES.register("at")
class MetricAdversarialTraining(AdversarialTraining):
    """PGD adversarial training on the metric, half of each batch adversarial."""


@DEFENSES.register("goat")
class GOAT(AdversarialTraining):
    """GOAT (Bouniot et al. 2020): 100% adversarial batches, one same-identity batch guide,
    trained with the reference's triplet-only margin ranking loss on raw embeddings."""

    default_share = 1.0
    default_loss = "triplet"
    # 2: the reference's triplet-only loss replaced cross-entropy + triplet (now goat-ce).
    training_version = 2

    def __init__(self, loss: str | None = None, margin: float = 10.0, soft_margin: bool = False, **options):
        loss = self.default_loss if loss is None else loss
        if loss not in GOAT_LOSSES:
            raise ReIDBenchError(f"defense '{self.registry_name}': loss must be one of {GOAT_LOSSES}, got '{loss}'")
        super().__init__(**options)
        self.params["loss"] = loss
        if loss == "triplet":  # the shared loss takes its margin from the recipe
            self.params.update(margin=float(margin), soft_margin=bool(soft_margin))

    def training_loss(self, model, batch, recipe):
        if self.params["loss"] == "ce-triplet":
            return super().training_loss(model, batch, recipe)
        _, features = model(batch.images)
        triplet = batch_hard_triplet(features, batch.pids, None if self.params["soft_margin"] else self.params["margin"])
        return triplet, {"triplet": float(triplet.detach())}


@DEFENSES.register("goat-ce")
class GOATCrossEntropy(GOAT):
    """GOAT's adversarial batches trained with the shared loss (label-smoothed cross-entropy +
    batch-hard triplet on the recipe's margin): ``goat`` as it was before training version 2."""

    default_loss = "ce-triplet"
    training_version = 1


@DEFENSES.register("goat-sma")
class GOATSelf(GOAT):
    """GOAT with the self metric attack: the guide is the image's own clean feature."""

    guides = "sma"


@DEFENSES.register("goat-fna")
class GOATFurthestNegative(GOAT):
    """GOAT with the furthest-negative attack: 4 same-identity push guides, 1 farthest-negative pull guide."""

    guides = "fna"
    default_push_guides = 4
