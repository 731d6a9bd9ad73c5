"""APD, "Adversarial Perturbation and Defense for generalizable person re-identification"
(Tan, Xu, Tao, Liu; Neural Networks 186, 107287, 2025).

APD trains a ReID model for domain generalization on *hard matching samples*: a generator,
MPG-Net, perturbs the metric relations of training images "in the latent space, while
preserving the essential visual details", and the ReID model, SP-Net, learns from clean and
generated images with the SSD scheme ("Semantic Self-perturbation and Defense"), which
disentangles identity-relevant from identity-irrelevant features and purifies the former.
The paper publishes no code and few hyperparameters; the abstract is all this module can
cite. Every choice below is ours, says which reading it takes, and is a parameter of
``defense: {name: apd, ...}``.

MPG-Net (:class:`MetricPerturbationGenerator`)
  An encoder-decoder on images in [0, 1]: encoder E (two stride-2 convolutions, ``width``
  channels doubling) to a latent map z, a latent perturber P (two 3×3 convolutions, the last
  zero-initialised so that training starts from no perturbation), decoder D (two ×2
  upsamplings, sigmoid output). "Perturb in the latent space" is read as perturbing z:
  z' = z + P(z), decoded. ``decode`` says how the decoded image becomes the sample:

  * ``"residual"`` (default): what the latent shift changes in decoded space is added to
    the original, ``x + ε·tanh((D(z') − D(z))/ε)``, so every detail of ``x`` that the shift
    does not touch is kept exactly, and no pixel moves by more than ε;
  * ``"image"``: the decoded image itself, softly projected into the ε-ball around x,
    ``x + ε·tanh((D(z') − x)/ε)``.

  The result is clamped to [0, 1]. ε = ``eps_255``/255 (default 16/255: hard samples for
  generalization, not imperceptible attacks; the paper gives no bound).

  Generator objective, minimised by Adam (betas (0.5, 0.999), the DCGAN / pix2pix
  convention; ``gen_lr`` 1e-3 rather than their 2e-4, since a CPU-scale run has only a few
  hundred steps and the zero-initialised perturber must grow within them) for ``gen_steps``
  steps per training batch, alternating with the ReID model's step as in a GAN: the metric relation loss of :func:`metric_perturbation_loss`
  (mean distance of a generated image to the clean images of *other* identities minus to
  those of its *own* identity, its own clean image included; L2-normalised embeddings of the
  model being trained, in eval mode, i.e. the metric the protocol measures) plus
  ``struct_weight``·structural(x', x) plus ``rec_weight``·structural(D(z), x), the latter
  keeping the decoder a faithful reconstructor so that the latent space stays one of
  images. structural = L1 + ``ssim_weight``·(1 − SSIM), SSIM with an 11-tap Gaussian
  window of σ = 1.5 (Wang et al., TIP 2004).

SP-Net (:class:`SemanticPurificationModel`, zoo ``model: {head: apd-split}``)
  A :class:`~reidbench.models.ReIDModel` whose backbone feature map F is split by a
  per-sample channel gate a = σ(MLP(avgpool F)) (squeeze-and-excitation form, reduction
  ``gate_reduction`` = 16): identity-relevant F·a and identity-irrelevant F·(1 − a). The
  identity part is pooled and goes through the usual BNNeck; at test time the embedding is
  the identity part's, so the deployed model is a plain ReIDModel to every attack.

SSD scheme (:meth:`APD.training_loss`)
  Read as: the network perturbs its own identity-irrelevant features and defends its
  identity features against that perturbation. Self-perturbation: the irrelevant part's
  channel statistics are mixed with another sample's of the batch (MixStyle, Zhou et al.,
  ICLR 2021, λ ~ Beta(``mix_alpha``, ``mix_alpha``), statistics detached); the map is
  recombined and split again by the gate. Defense: the identity feature of the recombined
  map is pulled to the clean one (MSE of L2-normalised features, ``self_weight``), and the
  identity feature of each MPG sample to that of its clean source (``mpg_weight``); the
  targets are detached, so the perturbed view moves, not the clean one. On top, the
  standard loss (label-smoothed cross-entropy + batch-hard triplet of the recipe) on the
  identity part of clean and MPG images together, each MPG image labelled as its source.
  The consistency on MPG samples is what keeps the gate from the trivial split a = 1
  (nothing irrelevant, nothing to perturb): features that MPG can move must leave the
  identity part.

Training batches are twice the P×K batch: clean images then their MPG versions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from reidbench.defense import Defense
from reidbench.errors import ReIDBenchError
from reidbench.features import embed
from reidbench.models.reid_model import ReIDModel
from reidbench.registry import DEFENSES, MODEL_HEADS
from reidbench.train.losses import reid_terms

from .jad import gaussian_blur

DECODES = ("residual", "image")


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """(B,) mean structural similarity (Wang et al., TIP 2004) of images in [0, 1], with a
    Gaussian window; differentiable."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = gaussian_blur(x, sigma), gaussian_blur(y, sigma)
    var_x = gaussian_blur(x * x, sigma) - mu_x ** 2
    var_y = gaussian_blur(y * y, sigma) - mu_y ** 2
    cov = gaussian_blur(x * y, sigma) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return score.flatten(1).mean(1)


def structural_loss(x: torch.Tensor, target: torch.Tensor, ssim_weight: float = 1.0) -> torch.Tensor:
    """L1 + ``ssim_weight``·(1 − SSIM): pixel fidelity plus local structure; 0 for identical images."""
    return (x - target).abs().mean() + ssim_weight * (1 - ssim(x, target)).mean()


def metric_perturbation_loss(feats: torch.Tensor, clean_feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """What MPG-Net minimises: mean distance from each generated image to the clean images of
    other identities minus that to the clean images of its own identity (itself included),
    i.e. same identities pushed apart and different ones pulled together."""
    dist = torch.cdist(feats, clean_feats)
    same = pids.view(-1, 1) == pids.view(1, -1)
    if same.all():
        return -dist.mean()
    return dist[~same].mean() - dist[same].mean()


class MetricPerturbationGenerator(nn.Module):
    """MPG-Net: encoder, latent perturber, decoder (see the module docstring)."""

    def __init__(self, width: int = 16, eps: float = 16 / 255, decode: str = "residual"):
        super().__init__()
        if decode not in DECODES:
            raise ReIDBenchError(f"defense 'apd': decode must be one of {DECODES}, got '{decode}'")
        self.eps, self.decode = float(eps), decode
        w = int(width)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.InstanceNorm2d(2 * w, affine=True), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.InstanceNorm2d(4 * w, affine=True), nn.ReLU(inplace=True),
        )
        self.perturber = nn.Sequential(nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True),
                                       nn.Conv2d(4 * w, 4 * w, 3, padding=1))
        nn.init.zeros_(self.perturber[-1].weight)
        nn.init.zeros_(self.perturber[-1].bias)
        self.up1 = nn.Sequential(nn.Conv2d(4 * w, 2 * w, 3, padding=1), nn.InstanceNorm2d(2 * w, affine=True), nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(w, 3, 3, padding=1))

    def decoder(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        y = self.up1(F.interpolate(z, size=((h + 1) // 2, (w + 1) // 2), mode="nearest"))
        return torch.sigmoid(self.up2(F.interpolate(y, size=(h, w), mode="nearest")))

    def forward(self, x: torch.Tensor, with_reconstruction: bool = False):
        """The hard matching sample of ``x`` (and, if asked, the unperturbed reconstruction D(z))."""
        z = self.encoder(x)
        size = tuple(x.shape[-2:])
        perturbed = self.decoder(z + self.perturber(z), size)
        recon = self.decoder(z, size) if (with_reconstruction or self.decode == "residual") else None
        change = perturbed - (recon if self.decode == "residual" else x)
        out = (x + self.eps * torch.tanh(change / self.eps)).clamp(0.0, 1.0)
        return (out, recon) if with_reconstruction else out


def mix_statistics(fmap: torch.Tensor, generator: torch.Generator, alpha: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """MixStyle (Zhou et al., ICLR 2021): each sample's channel mean/std replaced by a
    Beta(α, α) mix of its own and a random other sample's (statistics detached)."""
    b = fmap.shape[0]
    mu = fmap.mean(dim=(2, 3), keepdim=True).detach()
    sig = (fmap.var(dim=(2, 3), keepdim=True, correction=0) + eps).sqrt().detach()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=b)).to(fmap).view(b, 1, 1, 1)
    perm = torch.randperm(b, generator=generator).to(fmap.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return (fmap - mu) / sig * sig_mix + mu_mix


@MODEL_HEADS.register("apd-split")
class SemanticPurificationModel(ReIDModel):
    """SP-Net: a ReIDModel whose feature map is split by a channel gate into identity-relevant
    and identity-irrelevant parts; the embedding is the identity part's."""

    options = ("gate_reduction",)

    def __init__(self, *args, gate_reduction: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        if int(gate_reduction) < 1:
            raise ReIDBenchError(f"model head 'apd-split': gate_reduction must be >= 1, got {gate_reduction}")
        self.config.update(head="apd-split", gate_reduction=int(gate_reduction))
        hidden = max(1, self.feat_dim // int(gate_reduction))
        self.gate = nn.Sequential(nn.Linear(self.feat_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, self.feat_dim))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone.forward_features((x - self.mean) / self.std)
        if fmap.dim() != 4:
            raise ReIDBenchError(f"model head 'apd-split' needs a backbone with a spatial feature map; "
                                 f"'{self.config['backbone']}' returns shape {tuple(fmap.shape)}")
        return fmap

    def split(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(identity-relevant, identity-irrelevant) parts of a feature map; they sum to it."""
        gate = torch.sigmoid(self.gate(fmap.mean(dim=(2, 3)))).view(*fmap.shape[:2], 1, 1)
        return fmap * gate, fmap * (1 - gate)

    def pool_map(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(fmap) if self.pool is None else self.pool(fmap).flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_map(self.split(self.feature_map(x))[0])


@DEFENSES.register("apd")
class APD(Defense):
    """APD (Tan et al. 2025): MPG-Net hard samples + SP-Net trained with the SSD scheme."""

    def __init__(self, eps_255: float = 16.0, width: int = 16, decode: str = "residual", gen_lr: float = 1e-3,
                 gen_steps: int = 1, struct_weight: float = 1.0, rec_weight: float = 1.0, ssim_weight: float = 1.0,
                 mpg_weight: float = 1.0, self_weight: float = 1.0, mix_alpha: float = 0.1, seed: int = 0):
        super().__init__(eps_255=eps_255, width=width, decode=decode, gen_lr=gen_lr, gen_steps=gen_steps,
                         struct_weight=struct_weight, rec_weight=rec_weight, ssim_weight=ssim_weight,
                         mpg_weight=mpg_weight, self_weight=self_weight, mix_alpha=mix_alpha, seed=seed)
        if not 0 < eps_255 <= 255:
            raise ReIDBenchError(f"defense 'apd': eps_255 must be in (0, 255], got {eps_255}")
        if int(gen_steps) < 1 or int(width) < 1:
            raise ReIDBenchError(f"defense 'apd': gen_steps and width must be >= 1, got {gen_steps} and {width}")
        if gen_lr <= 0 or mix_alpha <= 0:
            raise ReIDBenchError(f"defense 'apd': gen_lr and mix_alpha must be > 0, got {gen_lr} and {mix_alpha}")
        weights = dict(struct_weight=struct_weight, rec_weight=rec_weight, ssim_weight=ssim_weight,
                       mpg_weight=mpg_weight, self_weight=self_weight)
        negative = sorted(k for k, v in weights.items() if v < 0)
        if negative:
            raise ReIDBenchError(f"defense 'apd': loss weights must be >= 0, got {', '.join(f'{k}={weights[k]}' for k in negative)}")
        with torch.random.fork_rng(devices=[]):  # the generator's initialisation is its own, seeded
            torch.manual_seed(int(seed))
            self.generator = MetricPerturbationGenerator(width, eps_255 / 255.0, decode)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=gen_lr, betas=(0.5, 0.999))
        self._pending_state = None
        self._mix_seed = 0
        self._generator_logs: dict = {}

    # --- MPG-Net ----------------------------------------------------------------------
    def _on(self, device: torch.device) -> None:
        self.generator.to(device)
        if self._pending_state is not None:  # optimizer state lands on its parameters' device
            self.generator.load_state_dict(self._pending_state["generator"])
            self.optimizer.load_state_dict(self._pending_state["optimizer"])
            self._pending_state = None

    def generator_step(self, model: nn.Module, images: torch.Tensor, pids: torch.Tensor) -> dict:
        """One MPG-Net update against the (fixed) model; returns its loss terms."""
        self._on(images.device)
        self.generator.train()
        with torch.no_grad():
            clean = embed(model, images)
        out, recon = self.generator(images, with_reconstruction=True)
        metric = metric_perturbation_loss(embed(model, out), clean, pids)
        w = self.params
        struct = structural_loss(out, images, w["ssim_weight"])
        rec = structural_loss(recon, images, w["ssim_weight"])
        loss = metric + w["struct_weight"] * struct + w["rec_weight"] * rec
        params = [p for p in self.generator.parameters() if p.requires_grad]
        # Gradients for the generator only: the model is the fixed metric in this step.
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"mpg_metric": float(metric.detach()), "mpg_struct": float(struct.detach()), "mpg_rec": float(rec.detach())}

    def training_batch(self, model, images, pids, generator):
        was_training = model.training
        model.eval()
        for _ in range(int(self.params["gen_steps"])):
            self._generator_logs = self.generator_step(model, images, pids)
        with torch.no_grad():
            hard = self.generator(images)
        model.train(was_training)
        self._mix_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return torch.cat([images, hard.to(images.dtype)])

    # --- SP-Net with SSD ----------------------------------------------------------------
    def training_loss(self, model, images, pids, recipe):
        if not isinstance(model, SemanticPurificationModel):
            raise ReIDBenchError("defense 'apd' trains the SP-Net model: give its zoo entry `model: {head: apd-split}`")
        b = pids.shape[0]
        if images.shape[0] != 2 * b:
            raise ReIDBenchError("defense 'apd': a training batch must be the clean images followed by their MPG samples")
        labels = pids.repeat(2)
        identity, irrelevant = model.split(model.feature_map(images))
        feats = model.pool_map(identity)
        logits = model.classifier(model.bottleneck(feats)) if model.classifier is not None else None
        loss, logs = reid_terms(logits, feats, labels, recipe)

        unit = F.normalize(feats, dim=1)
        mpg = (unit[b:] - unit[:b].detach()).pow(2).sum(1).mean()
        mixed = mix_statistics(irrelevant, torch.Generator().manual_seed(self._mix_seed), self.params["mix_alpha"])
        purified = F.normalize(model.pool_map(model.split(identity + mixed)[0]), dim=1)
        self_perturbed = (purified - unit.detach()).pow(2).sum(1).mean()
        loss = loss + self.params["mpg_weight"] * mpg + self.params["self_weight"] * self_perturbed
        logs.update(self._generator_logs, ssd_mpg=float(mpg.detach()), ssd_self=float(self_perturbed.detach()))
        return loss, logs

    # --- resumption -----------------------------------------------------------------------
    def training_state(self) -> dict:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_training_state(self, state: dict) -> None:
        if state:
            self._pending_state = state
