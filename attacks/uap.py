"""Universal adversarial perturbation (UAP) against a ReID model: one image-agnostic δ,
learned on training images, added to every query.

The universal attack of Moosavi-Dezfooli et al., "Universal adversarial perturbations"
(CVPR 2017), in the form of Ding et al., "Universal Adversarial Perturbations Against Person
Re-Identification" (arXiv:1910.14184, 2019; extended as "Beyond Universal Person
Re-Identification Attack", IEEE TIFS 2021): a list-wise objective that lowers the average
precision of the ranking lists themselves, optimised over mini-batches of training images.
"""

from __future__ import annotations

import json

import torch

from reidbench.attack import Attack, AttackContext, TrainView
from reidbench.cache import weights_fingerprint
from reidbench.data.sampler import PKSampler
from reidbench.errors import ReIDBenchError
from reidbench.features import embed, model_device
from reidbench.progress import progress_bar
from reidbench.registry import ATTACKS

from .dmr import train_fingerprint


def smooth_average_precision(query_feats: torch.Tensor, gallery_feats: torch.Tensor, pids: torch.Tensor,
                             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid-relaxed AP (Smooth-AP, Brown et al., ECCV 2020) of each query's ranking of the
    batch, and whether the query has a positive; both (B,).

    Query ``i`` ranks gallery entries ``j ≠ i`` (its own image is not in a test gallery) by
    the similarity ``q_i · g_j``, which orders L2-normalised features as the protocol's
    Euclidean distance does. The rank of a positive ``p`` is ``1 + Σ_j σ((s_ij − s_ip)/τ)``
    over the valid entries ``j ≠ p``, and over the positives alone for its rank among them;
    AP is the mean over positives of their ratio.
    """
    sim = query_feats @ gallery_feats.t()
    n = len(pids)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    positive = (pids.view(-1, 1) == pids.view(1, -1)) & ~eye
    # above[i, p, j] = σ((s_ij − s_ip)/τ): how much gallery entry j outranks positive p for query i.
    above = torch.sigmoid((sim.unsqueeze(1) - sim.unsqueeze(2)) / temperature)
    counted = (~eye).unsqueeze(1) & ~eye.unsqueeze(0)  # j ≠ i (not in the gallery) and j ≠ p (itself)
    rank_all = 1 + (above * counted).sum(-1)
    rank_positive = 1 + (above * (counted & positive.unsqueeze(1))).sum(-1)
    ap = (rank_positive / rank_all * positive).sum(1) / positive.sum(1).clamp_min(1)
    return ap, positive.any(1)


@ATTACKS.register("uap")
class UniversalPerturbation(Attack):
    """One perturbation δ ∈ [−ε, ε]^(3×H×W) for all queries, learned white-box against the
    attacked model on its training images (``ctx.train``); no test image is used.

    Objective: the list-wise attack of Ding et al. (2019). Each training image of a P×K
    identity batch (Hermans et al., 2017), perturbed by δ, queries the batch's clean images,
    and δ lowers the mean average precision of those ranking lists. AP is relaxed with the
    sigmoid of Smooth-AP (Brown et al., ECCV 2020); Ding et al.'s own relaxation may differ
    in form, not in what it optimises. A list-wise loss attacks what mAP measures: it needs
    no margin or guide and moves every positive down, not only the nearest one.
    ``temperature`` τ = 0.03 rather than Smooth-AP's 0.01 (tuned for training a model):
    a universal δ must move many pairs at once, and at 0.01 the sigmoid saturates for all
    but the pairs already at a rank boundary. On the synthetic ``small`` ResNet-18 baseline
    (ε = 5/255, 15 epochs) τ = 0.01 / 0.03 / 0.1 lower mAP from 0.386 to 0.282 / 0.264 / 0.269.

    Optimisation: projected sign-gradient descent on that AP, one step of size ``step`` per
    mini-batch, δ projected onto the ε-ball after each step and starting at 0 (the
    mini-batch stochastic form of UAP of Shafahi et al., "Universal Adversarial Training",
    AAAI 2020). The protocol's budget maps as: ``iterations`` = epochs over the training
    identities (``ceil(#ids / batch_p)`` steps each), ``step`` = the step size.

    ``eot_samples > 1`` sums each step's gradient over that many forward passes: EOT
    (Athalye et al., ICML 2018) against a stochastic input transform, as the iterative
    attacks do.

    δ is learned once per model and kept in the instance, keyed by ``id(model)``, the
    model's weights fingerprint and the training set, so that every query batch reuses it
    and no other model ever does. ``eps`` bounds δ; the queries' [0, 1] clip may shorten it
    on saturated pixels, as it does in training.
    """

    threat_model = "white-box"
    needs = ("train",)
    supports_eot = True
    universal = True

    def __init__(self, eps, step, iterations, seed=0, batch_p: int = 8, batch_k: int = 4, temperature: float = 0.03,
                 eot_samples: int = 1):
        if eot_samples < 1:
            raise ReIDBenchError(f"attack 'uap': eot_samples must be >= 1, got {eot_samples}")
        if batch_p < 2 or batch_k < 2:
            raise ReIDBenchError(f"attack 'uap': the ranking lists need batch_p >= 2 identities of batch_k >= 2 "
                                 f"images, got {batch_p} x {batch_k}")
        if temperature <= 0:
            raise ReIDBenchError(f"attack 'uap': temperature must be > 0, got {temperature}")
        super().__init__(eps, step, iterations, seed, batch_p=int(batch_p), batch_k=int(batch_k),
                         temperature=float(temperature))
        # An attribute, as in IterativeMetricAttack: the runner raises it against a stochastic defense.
        self.eot_samples = int(eot_samples)
        self._deltas: dict[tuple, torch.Tensor] = {}

    def describe(self) -> dict:
        return {**super().describe(), "eot_samples": self.eot_samples}

    def universal_perturbation(self, model: torch.nn.Module, ctx: AttackContext) -> torch.Tensor:
        """δ (3, H, W) for ``model`` at the training view's size: remembered, or learned now."""
        if ctx.train is None:
            raise ReIDBenchError("attack 'uap' needs training images in its context")
        key = (id(model), weights_fingerprint(model), json.dumps(train_fingerprint(ctx.train), sort_keys=True),
               self.eot_samples)
        if key not in self._deltas:
            self._deltas[key] = self._learn(model, ctx.train)
        return self._deltas[key]

    def _learn(self, model: torch.nn.Module, train: TrainView) -> torch.Tensor:
        p = self.params
        # universal_perturbation is public (learned outside __call__): it freezes the
        # statistics itself
        model.eval()
        device = model_device(model)
        delta = torch.zeros(3, *train.size, device=device)
        sampler = PKSampler(train.subset.pids, p=p["batch_p"], k=p["batch_k"], seed=self.seed)
        with progress_bar() as bar:
            task = bar.add_task("uap: learning δ", total=self.iterations * len(sampler))
            for epoch in range(self.iterations):
                sampler.set_epoch(epoch)
                for index in sampler:
                    x = train.subset.load(index, train.size).to(device)
                    pids = train.subset.pids[index].to(device)
                    with torch.no_grad():
                        clean = embed(model, x)
                    grad = torch.zeros_like(delta)
                    for _ in range(self.eot_samples):
                        d = delta.clone().requires_grad_(True)
                        ap, has_positive = smooth_average_precision(embed(model, (x + d).clamp(0, 1)), clean, pids,
                                                                    p["temperature"])
                        mean_ap = ap[has_positive].mean()
                        # autograd.grad w.r.t. δ only: the model's parameters collect no gradient.
                        grad += torch.autograd.grad(mean_ap, d)[0]
                    delta = (delta - self.step * grad.sign()).clamp(-self.eps, self.eps)
                    bar.update(task, advance=1, description=f"uap: smooth AP {mean_ap.item():.3f}")
        return delta

    def perturb(self, model, queries, ctx):
        delta = self.universal_perturbation(model, ctx)
        if tuple(delta.shape[-2:]) != tuple(queries.shape[-2:]):
            raise ReIDBenchError(f"attack 'uap': δ was learned at {tuple(delta.shape[-2:])}, "
                                 f"the queries are {tuple(queries.shape[-2:])}")
        return (queries + delta.to(queries.device)).clamp(0, 1)
