"""SADSTRM: adversarial self-attack defense with spatial-temporal relation mining, for
visible-infrared video person ReID (Li, Xu, Zhang, Tao, Yu, "Adversarial Self-Attack Defense
and Spatial-Temporal Relation Mining for Visible-Infrared Video Person Re-Identification",
arXiv:2307.03903, 2023; IEEE TIFS 2024). The paper's code was not released; everything below
is our reading of its abstract and method description, each open choice a parameter.

The paper treats the nuisances inside the training samples -- viewpoint, pose, background
and the modality gap -- as an adversarial perturbation of the identity features, and attacks
the model by *activating* that interference instead of crafting adversarial inputs (the
"self-attack"); the defense makes features more discriminative and trains adversarially on
the activated samples; a spatial-temporal relation network aggregates the frames.

* **Self-attack (feature level, no adversarial examples).** The interference of a frame is
  read as its *style*: the per-channel mean and standard deviation of an early feature map
  (the statistics that carry illumination, background texture and modality, and that
  style-mixing and uncertainty methods perturb). At the output of backbone stage
  ``style_stage`` (timm ``feature_info`` index; 1 = the first residual stage of a ResNet),
  each frame's statistics get shifts ``Δμ, Δσ`` (AdaIN form ``x + Δμ + (x − μ)/σ · Δσ``). They
  are one signed gradient-ascent step from zero, ``Δ = style_eps · s · sign(∇_Δ J)``, where
  ``s`` is the batch standard deviation of that statistic per channel (so the shift stays
  within the range of styles the batch actually shows) and the attack objective ``J`` is
  the identity cross-entropy plus ``gap_weight`` times the cross-modality gap
  (:func:`modality_gap`, the squared distance between each identity's visible and infrared
  feature centres): the shift moves each frame's style in the direction that most hurts
  identity and most separates the modalities. ``Δσ`` is kept above ``-σ/2`` so the shifted
  style stays a style.
* **Defense.** Loss = standard loss (label-smoothed cross-entropy + batch-hard triplet, the
  recipe's weights) on clean tracklets + ``adversarial_weight`` × the same loss on the
  self-attacked ones (adversarial training) + ``center_weight`` × the hetero-centre loss
  (Zhu et al., Neurocomputing 2020: the same squared distance between each identity's
  visible and infrared centres) over clean and attacked features together (discriminability
  across modality). The batch-hard triplet loss already mixes both modalities in a P × K
  batch. Both gaps take L2-normalised features, as the protocol compares them
  (``normalize_gap=False``: raw features, as the original hetero-centre loss). The attacked
  pass runs in training mode, so batch-norm running statistics also see the attacked
  styles, as in feature-statistics augmentation (``attacked_bn_update=False`` restores them
  after that pass).
* **Spatial-temporal relation mining**: the model, :class:`reidbench.models.VideoReIDModel`
  (part-level relations across frames guide the aggregation); a zoo entry selects it with
  ``model: {video: {...}}``. The defense itself adds no inference-time transform.

Costs: two forward passes and one backward of the clean graph per batch (about 2x standard
training). P x K batches draw K tracklets per identity whatever their modality, so an
identity may miss a modality in a batch; the gap terms then skip it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reidbench.defense import Defense
from reidbench.errors import ReIDBenchError
from reidbench.registry import DEFENSES
from reidbench.train.losses import cross_entropy_label_smoothing, reid_terms


def modality_gap(features: torch.Tensor, pids: torch.Tensor, modality: torch.Tensor,
                 normalize: bool = True) -> torch.Tensor:
    """Mean over identities seen in both modalities of ``|c_visible − c_infrared|²``, the
    distance between the identity's feature centres in each modality (0 when none is).
    With ``normalize``, features are L2-normalised first, as the protocol compares them:
    the gap is then in [0, 4] whatever the feature scale, and shrinking the features cannot
    fake it away."""
    features = F.normalize(features.float(), dim=1) if normalize else features.float()
    ids, inverse = torch.unique(pids, return_inverse=True)
    sums = torch.zeros(2, len(ids), features.shape[1], device=features.device)
    counts = torch.zeros(2, len(ids), device=features.device)
    sums.index_put_((modality, inverse), features, accumulate=True)
    counts.index_put_((modality, inverse), torch.ones_like(inverse, dtype=counts.dtype), accumulate=True)
    both = (counts > 0).all(0)
    if not bool(both.any()):
        return features.sum() * 0.0
    centres = sums[:, both] / counts[:, both].unsqueeze(-1)
    return (centres[0] - centres[1]).pow(2).sum(1).mean()


class StyleShift:
    """Forward hook re-styling a stage's (N, C, h, w) output. With ``shift`` None it adds
    zero-valued, gradient-tracking shifts (recording pass), else the given fixed shifts."""

    def __init__(self):
        self.shift: tuple[torch.Tensor, torch.Tensor] | None = None
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None
        self.spread: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, module, inputs, output):
        mu = output.mean((2, 3), keepdim=True)
        sigma = (output.var((2, 3), keepdim=True, unbiased=False) + 1e-6).sqrt()
        if self.shift is None:
            d_mu = torch.zeros_like(mu, requires_grad=True)
            d_sigma = torch.zeros_like(sigma, requires_grad=True)
            self.recorded = (d_mu, d_sigma)
            flat_mu, flat_sigma = mu.detach().flatten(1).float(), sigma.detach().flatten(1).float()
            self.spread = (flat_mu.std(0, unbiased=False).view_as(mu[0]), flat_sigma.std(0, unbiased=False).view_as(mu[0]))
        else:
            d_mu, d_sigma = self.shift
            d_sigma = torch.maximum(d_sigma, -0.5 * sigma.detach())
        return output + d_mu.to(output.dtype) + (output - mu) / sigma * d_sigma.to(output.dtype)


def stage_module(model: nn.Module, stage: int) -> nn.Module:
    """The backbone module whose output is timm ``feature_info[stage]``."""
    backbone = getattr(model, "backbone", None)
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ReIDBenchError("defense 'sadstrm' needs a timm backbone with feature_info to find its style stage")
    names = [i["module"] for i in info] if isinstance(info, list) else info.module_name()
    if not 0 <= stage < len(names):
        raise ReIDBenchError(f"defense 'sadstrm': style_stage must be in 0..{len(names) - 1} for this backbone, got {stage}")
    return backbone.get_submodule(names[stage])


@DEFENSES.register("sadstrm")
class SelfAttackDefense(Defense):
    """SADSTRM (Li et al. 2023): feature-style self-attack + adversarial training + hetero-centre
    loss, for visible-infrared video with the spatial-temporal relation model."""

    data_kinds = ("video",)

    def __init__(self, style_eps: float = 1.0, style_stage: int = 1, gap_weight: float = 1.0,
                 adversarial_weight: float = 1.0, center_weight: float = 0.5, normalize_gap: bool = True,
                 attacked_bn_update: bool = True):
        super().__init__(style_eps=float(style_eps), style_stage=int(style_stage), gap_weight=float(gap_weight),
                         adversarial_weight=float(adversarial_weight), center_weight=float(center_weight),
                         normalize_gap=bool(normalize_gap), attacked_bn_update=bool(attacked_bn_update))
        negative = [k for k, v in self.params.items() if not isinstance(v, bool) and k != "style_stage" and v < 0]
        if negative:
            raise ReIDBenchError(f"defense 'sadstrm': {', '.join(negative)} must be >= 0")

    def check_dataset(self, split) -> None:
        super().check_dataset(split)
        if split.train.modality is None:
            raise ReIDBenchError(f"defense '{self.registry_name}' needs visible/infrared modality labels, "
                                 f"but dataset '{split.name}' has none")

    def self_attack(self, hook: StyleShift, logits, features, pids, modality) -> None:
        """Set ``hook.shift`` to one signed ascent step of the attack objective (module docstring)."""
        p = self.params
        identity = cross_entropy_label_smoothing(logits, pids, 0.0) if logits is not None else features.sum() * 0.0
        objective = identity + p["gap_weight"] * modality_gap(features, pids, modality, p["normalize_gap"])
        grads = torch.autograd.grad(objective, hook.recorded, retain_graph=True, allow_unused=True)
        hook.shift = tuple(
            p["style_eps"] * spread * (g.sign() if g is not None else torch.zeros_like(spread))
            for g, spread in zip(grads, hook.spread))

    def training_loss(self, model, batch, recipe):
        images, pids, modality = batch.images, batch.pids, batch.modality
        if modality is None:
            raise ReIDBenchError(f"defense '{self.registry_name}' needs the modality of every training sample, "
                                 "and this training batch has none")
        p = self.params
        hook = StyleShift()
        handle = stage_module(model, p["style_stage"]).register_forward_hook(hook)
        try:
            logits, features = model(images)
            clean, logs = reid_terms(logits, features, pids, recipe)
            self.self_attack(hook, logits, features, pids, modality)
            # Batch-norm buffers to restore when the attacked styles must not enter the running statistics.
            saved = [] if p["attacked_bn_update"] else [
                (b, b.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for b in m.buffers()]
            attacked_logits, attacked = model(images)
            for buffer, value in saved:
                buffer.copy_(value)
        finally:
            handle.remove()
        adversarial, _ = reid_terms(attacked_logits, attacked, pids, recipe)
        centre = modality_gap(torch.cat([features, attacked]), pids.repeat(2), modality.repeat(2), p["normalize_gap"])
        loss = clean + p["adversarial_weight"] * adversarial + p["center_weight"] * centre
        logs.update(adversarial=float(adversarial.detach()), center=float(centre.detach()))
        return loss, logs
