"""APD, "Adversarial Perturbation and Defense for generalizable person re-identification"
(Tan, Xu, Tao, Liu; Neural Networks 186, 107287, 2025; no code published).

APD is a domain-generalization method: train on a source dataset A, test on unseen ones
(``reidbench eval --model ID --dataset OTHER``). Every item below says where it comes from:
**[paper]** the method section (the results tables were not available to us), **[ours]** our
choice where the text leaves it open. Every choice is a parameter of ``defense: {name: apd,
...}`` or, for the network itself, of the ``apd-split`` model head.

**Two stages** [paper], not alternating: stage 1 trains MPG-Net on the source training set
and makes with it a "New Source Domain" of hard matching samples; stage 2 trains SP-Net on
them. [ours] "On them" is read as the real training images plus one generated image per real
one, labelled with its source's identity and camera (``include_real: false`` trains on the
generated images alone). Stage 1 is ``Defense.prepare_train`` (run once per training run;
the trained MPG-Net and the generated set are cached under ``cache_dir()/apd``, keyed by the
split hash, the feature network's weights and every parameter that decides them); stage 2 is
:meth:`APD.training_loss` in the one shared training loop.

**Stage 1, MPG-Net** (:class:`MetricPerturbationGenerator`, :func:`train_mpg`), a GAN.

* [paper] For each sample x_i, M negatives x_ij of other identities drawn at random.
  [ours] M = ``negatives``, drawn uniformly from the whole training set.
* [paper] L_G = −½·E[log D(G(x_i))];  L_D = −½·E[log(1 − D(G(x_i)))] − ½·E[log D(x_ij)]:
  the negatives are the discriminator's "real" class, so G is pushed to look like other
  identities (:func:`generator_adversarial_loss`, :func:`discriminator_loss`).
* [paper] L_MP = softplus(d(ψ(G(x_i)), ψ(x_ij)) − d(ψ(G(x_i)), ψ(x_i))), d Euclidean, ψ the
  stage-4 features of a frozen ImageNet ResNet-50 (:func:`metric_perturbation_loss`).
  [ours] ψ is globally average-pooled (a metric embedding) and the loss is averaged over
  the M negatives.
* [paper] L_C = ‖φ(G(x_i)) − φ(x_i)‖₁, φ its stage-2 features (:func:`content_loss`);
  L_S = ‖G(G(x_i)) − G(x_i)‖₁, idempotence (:func:`idempotence_loss`). [ours] ‖·‖₁ is the
  mean absolute difference (weights independent of image size); L_S back-propagates through
  both G(G(x)) and G(x).
* [paper] L_MPG = L_G + 2.0·L_MP + 1.0·L_S + 1.0·L_C (``mp_weight``, ``idem_weight``,
  ``content_weight``); ``metric_stage`` 4 and ``content_stage`` 2 (timm feature indices:
  0 the stem, i the i-th ResNet stage).
* ``feature_net`` (ψ and φ): ``imagenet`` [paper] is timm's ``resnet50`` with ImageNet
  weights, which must be in the local Hugging Face cache when there is no network (else a
  one-line error). [ours] Or the id of a zoo entry whose trained weights are loaded frozen
  (trained first if missing, like ``init.from``); the CPU entries name their dataset's
  undefended baseline, since nothing can be downloaded there. Its images are resized to the
  entry's input size. [ours] Or ``{backbone, pretrained}``: an ImageNet network read from a
  local file pinned by sha256 (:mod:`reidbench.models.pretrained`), the paper's ψ and φ where
  only another architecture's ImageNet weights are at hand (the Market entries: MobileNetV2,
  whose five timm stages take ``metric_stage`` 4 and ``content_stage`` 2 as ResNet's do).
* [ours] G, the paper's layers not being available: a CycleGAN-style image-to-image
  network (Zhu et al., ICCV 2017) at ``gen_width`` channels, two stride-2 convolutions to a
  latent map at 1/4 resolution, ``gen_blocks`` residual blocks there (where the metric
  relation is perturbed), two ×2 upsamplings. It outputs a residual added to the image,
  its last convolution zero-initialised, so training starts from G = identity (content
  kept, idempotent) and the losses move it away. The paper has no ε bound; ``eps_255`` (off
  by default) bounds the residual softly, ε·tanh(r/ε). D: a PatchGAN (Isola et al., CVPR
  2017) of ``disc_width`` channels, its patch logits averaged by the BCE.
* [ours] Optimisation: ``mpg_steps`` alternating D / G Adam steps (lr ``mpg_lr`` 2e-4,
  betas (0.5, 0.999): the pix2pix / CycleGAN convention), ``mpg_batch`` anchors drawn
  uniformly, at the dataset's image size, seeded by ``seed``.
* [ours] The defaults are the CPU preset (M = 2, G of width 16 with 2 residual blocks, D of
  width 16, 500 steps of 16 anchors: about 0.45 s a step on one core at 64×32 with a
  ResNet-18 feature net, so stage 1 takes about 4 minutes); the GPU zoo entry is larger.

**Stage 2, SP-Net** (:class:`SemanticPurificationModel`, ``model: {head: apd-split}``).

* [paper] A ViT / TransReID baseline trained with cross-entropy and a soft-margin triplet
  softplus(d_ap − d_an). [ours] The zoo's timm ResNet backbone at CPU scale, with the
  recipe's label-smoothed CE and batch-hard triplet (the APD entries set ``triplet_margin:
  null``: the paper's soft margin).
* [paper] The split acts on the patch embedding E(x). [ours] On a ResNet, E(x) is the map
  after ``split_stage`` (head option; 0, the default, is the stem: convolution, BN, ReLU,
  max-pool, like a patch embedding a projection before any residual block; 1-3 after that
  ResNet stage). The rest of the backbone is the network the branches share.
* [paper] MSP: sigmoid attention maps from dilated convolutions, DC1 and DC3 3×3 with
  dilation 2, DC2 and DC4 2×2 with dilation 2; K(x) = ⅓(MSP₁ + MSP₂ + MSP₃) ⊙ E(x),
  NK(x) = E(x) − K(x). [ours] The composition, which the recovered text leaves partly open:
  MSP₁ = σ(DC1(E)), MSP₃ = σ(DC3(E)), MSP₂ = σ(DC2(MSP₃) + DC4(MSP₁)): DC2 stacked on
  σ(DC3) as the text reads, DC4 on the other branch so that all four convolutions are used;
  MSP₁ and MSP₃ see 5×5 and MSP₂ 7×7 (multi-scale). ``msp_maps`` (head option): ``element``
  (default; one attention value per channel and position) or ``spatial`` (one per position,
  broadcast over channels).
* [paper] SSD, three branches through the rest of the network with shared parameters:
  f = branch(K), trained with CE + triplet (L_K); f* = branch(K + NK̂), NK̂ the irrelevant
  parts shuffled across identities, CE + triplet with K's own label (L_K*); fⁿ = branch(NK),
  a reversed triplet softplus(d(a, n) − d(a, p)) and CE towards the negative's identity
  (L_NK). L_SP = 1.0·L_K + 0.5·L_NK + 0.1·L_K* (``k_weight``, ``nk_weight``,
  ``k_star_weight``). At test time only f: to every attack the deployed model is a plain
  embedding model on images in [0, 1].
* [ours] Shuffle: each sample gets the NK of a sample of another identity drawn uniformly
  from the batch (:func:`shuffle_partners`, drawn from the loop's generator). Reversed
  triplet (:func:`reversed_triplet`): batch-hard for the reversed order, the closest positive
  (the anchor itself excluded) and, with ``nk_negative: hardest`` (default), the farthest
  negative; ``partner`` takes the shuffle partner instead. "The negative's identity" is that
  negative's label, the CE target of fⁿ. L_NK weighs its terms by the recipe's
  ``triplet_weight`` and ``ce_weight`` as L_K does.
* [ours] Batch-norm running statistics follow branch 1 only (the deployed one); branches 2
  and 3 normalise with their own batch statistics but do not update the running ones.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from reidbench.data import cache_dir, concat_subsets
from reidbench.data.split import ReIDSubset
from reidbench.defense import Defense
from reidbench.errors import ReIDBenchError
from reidbench.models.reid_model import ReIDModel
from reidbench.progress import log, progress_bar
from reidbench.registry import DEFENSES, MODEL_HEADS
from reidbench.train.losses import cross_entropy_label_smoothing, reid_terms
from reidbench.cache import fingerprint as _fingerprint, load_verified
from reidbench.cache import save_safetensors as _atomic_safetensors, save_torch as _atomic_torch_save

#: bump when stage 1 changes what a cached MPG-Net or generated set would hold
MPG_VERSION = 1
IMAGENET = "imagenet"
_MPG_KEYS = ("metric_stage", "content_stage", "negatives", "gen_width", "gen_blocks", "disc_width", "eps_255",
             "mpg_steps", "mpg_batch", "mpg_lr", "mp_weight", "idem_weight", "content_weight", "seed")
NK_NEGATIVES = ("hardest", "partner")
MSP_MAPS = ("element", "spatial")


# --- stage 1: the MPG-Net losses -----------------------------------------------------------
def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_G = −½·E[log D(G(x))], from the discriminator's logits on generated images."""
    return 0.5 * F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_loss(fake_logits: torch.Tensor, negative_logits: torch.Tensor) -> torch.Tensor:
    """L_D = −½·E[log(1 − D(G(x_i)))] − ½·E[log D(x_ij)]: the negatives are the real class."""
    return 0.5 * (F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
                  + F.binary_cross_entropy_with_logits(negative_logits, torch.ones_like(negative_logits)))


def metric_perturbation_loss(generated: torch.Tensor, source: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """L_MP = softplus(d(ψ(G(x_i)), ψ(x_ij)) − d(ψ(G(x_i)), ψ(x_i))), averaged over the batch
    and the M negatives: (B, D) generated and source features, (B, M, D) negatives'."""
    to_negatives = (generated.unsqueeze(1) - negatives).norm(dim=-1)
    to_source = (generated - source).norm(dim=-1, keepdim=True)
    return F.softplus(to_negatives - to_source).mean()


def content_loss(generated_map: torch.Tensor, source_map: torch.Tensor) -> torch.Tensor:
    """L_C = ‖φ(G(x)) − φ(x)‖₁ (mean absolute difference)."""
    return (generated_map - source_map).abs().mean()


def idempotence_loss(twice: torch.Tensor, once: torch.Tensor) -> torch.Tensor:
    """L_S = ‖G(G(x)) − G(x)‖₁ (mean absolute difference): zero for an idempotent G."""
    return (twice - once).abs().mean()


def draw_negatives(pids: torch.Tensor, anchors: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """(B, m) indices of training images whose identity differs from each anchor's, uniform."""
    index = torch.randint(0, len(pids), (len(anchors), m), generator=generator)
    own = pids[anchors].unsqueeze(1)
    clash = pids[index] == own
    while clash.any():
        index[clash] = torch.randint(0, len(pids), (int(clash.sum()),), generator=generator)
        clash = pids[index] == own
    return index


# --- stage 1: the networks -----------------------------------------------------------------
class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.InstanceNorm2d(channels, affine=True), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), nn.InstanceNorm2d(channels, affine=True))

    def forward(self, x):
        return x + self.body(x)


class MetricPerturbationGenerator(nn.Module):
    """MPG-Net's G: image in [0, 1] -> hard matching sample in [0, 1] (module docstring)."""

    def __init__(self, width: int = 16, blocks: int = 2, eps: Optional[float] = None):
        super().__init__()
        w = int(width)
        self.eps = None if eps is None else float(eps)

        def conv(cin, cout, kernel, stride=1):
            return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2), nn.InstanceNorm2d(cout, affine=True),
                    nn.ReLU(inplace=True)]

        self.encoder = nn.Sequential(*conv(3, w, 7), *conv(w, 2 * w, 3, 2), *conv(2 * w, 4 * w, 3, 2))
        self.latent = nn.Sequential(*[_ResidualBlock(4 * w) for _ in range(int(blocks))])
        self.up1 = nn.Sequential(*conv(4 * w, 2 * w, 3))
        self.up2 = nn.Sequential(*conv(2 * w, w, 3))
        self.out = nn.Conv2d(w, 3, 7, padding=3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        z = self.latent(self.encoder(x))
        y = self.up1(F.interpolate(z, size=((h + 1) // 2, (w + 1) // 2), mode="nearest"))
        residual = self.out(self.up2(F.interpolate(y, size=(h, w), mode="nearest")))
        if self.eps is not None:
            residual = self.eps * torch.tanh(residual / self.eps)
        return (x + residual).clamp(0.0, 1.0)


class PatchDiscriminator(nn.Module):
    """MPG-Net's D: per-patch logits of "an image of another identity" (PatchGAN)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = int(width)
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.InstanceNorm2d(2 * w, affine=True), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * w, 4 * w, 3, 1, 1), nn.InstanceNorm2d(4 * w, affine=True), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * w, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class FrozenFeatures(nn.Module):
    """ψ and φ: a frozen ReIDModel's backbone read at two stages. ``forward`` returns the
    average-pooled ``metric_stage`` features (B, D) and the ``content_stage`` map."""

    def __init__(self, model: ReIDModel, metric_stage: int, content_stage: int, resize: bool = True):
        super().__init__()
        if not hasattr(model.backbone, "forward_intermediates"):
            raise ReIDBenchError(f"defense 'apd': feature_net backbone '{model.config['backbone']}' "
                                 "cannot return intermediate stages")
        stages = len(getattr(model.backbone, "feature_info", []))
        for name, stage in (("metric_stage", metric_stage), ("content_stage", content_stage)):
            if not 0 <= stage < stages:
                raise ReIDBenchError(f"defense 'apd': {name} must be in [0, {stages - 1}] for feature_net "
                                     f"backbone '{model.config['backbone']}', got {stage}")
        self.model = model.eval().requires_grad_(False)
        self.metric_stage, self.content_stage = int(metric_stage), int(content_stage)
        self.size = tuple(model.input_size) if resize else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        stages = sorted({self.metric_stage, self.content_stage})  # timm returns them in this order
        maps = dict(zip(stages, self.model.backbone.forward_intermediates(
            self.model.normalize(x), indices=stages, intermediates_only=True)))
        return maps[self.metric_stage].mean(dim=(2, 3)), maps[self.content_stage]


def mpg_losses(generator: nn.Module, discriminator: nn.Module, features: FrozenFeatures, x: torch.Tensor,
               negatives: torch.Tensor, weights: dict) -> tuple[torch.Tensor, dict]:
    """L_MPG of a batch: ``x`` (B, 3, H, W), ``negatives`` (B, M, 3, H, W)."""
    b, m = negatives.shape[:2]
    fake = generator(x)
    with torch.no_grad():
        source_vec, source_map = features(x)
        negative_vec = features(negatives.flatten(0, 1))[0].view(b, m, -1)
    fake_vec, fake_map = features(fake)
    adversarial = generator_adversarial_loss(discriminator(fake))
    metric = metric_perturbation_loss(fake_vec, source_vec, negative_vec)
    idem = idempotence_loss(generator(fake), fake)
    content = content_loss(fake_map, source_map)
    total = (adversarial + weights["mp_weight"] * metric + weights["idem_weight"] * idem
             + weights["content_weight"] * content)
    return total, {"mpg": float(total.detach()), "mpg_g": float(adversarial.detach()), "mpg_mp": float(metric.detach()),
                   "mpg_s": float(idem.detach()), "mpg_c": float(content.detach())}


def train_mpg(generator: nn.Module, discriminator: nn.Module, features: FrozenFeatures, images: torch.Tensor,
              pids: torch.Tensor, steps: int, batch: int, negatives: int, lr: float, weights: dict,
              rng: torch.Generator, device: str | torch.device = "cpu", progress: bool = True) -> list[dict]:
    """Stage 1 on uint8 ``images``: ``steps`` alternating D and G Adam steps. Returns each step's logs."""
    device = torch.device(device)
    generator.to(device).train()
    discriminator.to(device).train()
    features.to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    history = []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("apd: train MPG-Net", total=steps)
        for _ in range(steps):
            anchors = torch.randint(0, len(images), (batch,), generator=rng)
            negative_index = draw_negatives(pids, anchors, negatives, rng)
            x = images[anchors].to(device).float().div_(255)
            xn = images[negative_index.flatten()].to(device).float().div_(255)
            with torch.no_grad():
                fake = generator(x)
            d_loss = discriminator_loss(discriminator(fake), discriminator(xn))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            loss, logs = mpg_losses(generator, discriminator, features, x, xn.view(batch, negatives, *x.shape[1:]),
                                    weights)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()  # D collects gradients too; its optimiser clears them before its next step
            opt_g.step()
            history.append({**logs, "mpg_d": float(d_loss.detach())})
            bar.update(task, advance=1, description=f"apd: train MPG-Net L_MPG {logs['mpg']:.4f}")
    generator.eval()
    return history


# --- stage 2: SP-Net -------------------------------------------------------------------------
class MultiScalePerception(nn.Module):
    """MSP: the mean of three sigmoid attention maps from dilated convolutions (module docstring)."""

    def __init__(self, channels: int, maps: str = "element"):
        super().__init__()
        out = channels if maps == "element" else 1
        self.dc1 = nn.Conv2d(channels, out, 3, padding=2, dilation=2)
        self.dc3 = nn.Conv2d(channels, out, 3, padding=2, dilation=2)
        self.dc2 = nn.Conv2d(out, out, 2, padding=1, dilation=2)
        self.dc4 = nn.Conv2d(out, out, 2, padding=1, dilation=2)

    def maps(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        msp1 = torch.sigmoid(self.dc1(fmap))
        msp3 = torch.sigmoid(self.dc3(fmap))
        msp2 = torch.sigmoid(self.dc2(msp3) + self.dc4(msp1))
        return msp1, msp2, msp3

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return sum(self.maps(fmap)) / 3


@MODEL_HEADS.register("apd-split")
class SemanticPurificationModel(ReIDModel):
    """SP-Net: a ReIDModel whose early feature map E(x) is split by MSP into the identity part
    K and the rest NK = E − K; its embedding (branch 1) is computed from K alone."""

    options = ("split_stage", "msp_maps")

    def __init__(self, *args, split_stage: int = 0, msp_maps: str = "element", **kwargs):
        super().__init__(*args, **kwargs)
        from timm.models.efficientnet import EfficientNet
        from timm.models.resnet import ResNet

        if not isinstance(self.backbone, (ResNet, EfficientNet)):
            raise ReIDBenchError(f"model head 'apd-split' splits a timm ResNet or EfficientNet-family network "
                                 f"(MobileNetV2) after its stem or a stage; backbone '{self.config['backbone']}' is neither")
        if split_stage not in (0, 1, 2, 3):
            raise ReIDBenchError(f"model head 'apd-split': split_stage must be 0 (the stem) or 1-3, got {split_stage!r}")
        if msp_maps not in MSP_MAPS:
            raise ReIDBenchError(f"model head 'apd-split': msp_maps must be one of {MSP_MAPS}, got {msp_maps!r}")
        self.config.update(head="apd-split", split_stage=int(split_stage), msp_maps=msp_maps)
        # Names, not a new container: the backbone's weights keep their keys.
        if isinstance(self.backbone, ResNet):
            stages = ["layer1", "layer2", "layer3", "layer4"]
            self._front = ["conv1", "bn1", "act1", "maxpool"] + stages[:split_stage]
            self._rest = stages[split_stage:]
        else:
            # [ours] An EfficientNet-family trunk has no stem stage in feature_info: index i ends
            # at the block group that feature names (MobileNetV2: 0 blocks.0, 1 blocks.1, 2 blocks.2,
            # 3 blocks.4), so the split follows that group; the 1x1 head conv stays in the rest.
            last = int(self.backbone.feature_info[split_stage]["module"].split(".")[1])
            blocks = [f"blocks.{i}" for i in range(len(self.backbone.blocks))]
            self._front = ["conv_stem", "bn1"] + blocks[:last + 1]
            self._rest = blocks[last + 1:] + ["conv_head", "bn2"]
        # timm's feature_info: index 0 is the stem (its max-pool keeps the channels), i stage i.
        self.msp = MultiScalePerception(int(self.backbone.feature_info[split_stage]["num_chs"]), msp_maps)

    def embedding_map(self, x: torch.Tensor) -> torch.Tensor:
        """E(x): the map the split acts on, for images in [0, 1]."""
        x = self.normalize(x)
        for name in self._front:
            x = self.backbone.get_submodule(name)(x)
        return x

    def split(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, NK): identity-relevant part and the rest; they sum to ``fmap``."""
        identity = self.msp(fmap) * fmap
        return identity, fmap - identity

    def branch_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """The shared rest of the network on a part: its pooled pre-neck feature."""
        for name in self._rest:
            fmap = self.backbone.get_submodule(name)(fmap)
        return self.backbone.forward_head(fmap) if self.pool is None else self.pool(fmap).flatten(1)

    def branch(self, fmap: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(logits or None, pre-neck feature) of a part, through the shared neck and classifier."""
        feats = self.branch_features(fmap)
        logits = self.classifier(self.bottleneck(feats)) if self.classifier is not None else None
        return logits, feats

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch_features(self.split(self.embedding_map(x))[0])


# --- stage 2: the SSD losses -----------------------------------------------------------------
def shuffle_partners(pids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B,) for each sample the index of a batch sample of another identity, drawn uniformly."""
    pids = pids.cpu()
    other = (pids.view(-1, 1) != pids.view(1, -1)).float()
    if not other.sum(1).all():
        raise ReIDBenchError("defense 'apd': a training batch needs at least two identities to shuffle NK across them")
    return torch.multinomial(other, 1, generator=generator).view(-1)


def reversed_triplet(feats: torch.Tensor, pids: torch.Tensor,
                     negatives: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softplus(d(a, n) − d(a, p)) and the negative of each anchor: p its closest positive (not
    itself), n its farthest negative, or ``negatives[i]`` when given. Anchors without a
    positive are left out of the mean."""
    dist = torch.cdist(feats, feats)
    same = pids.view(-1, 1) == pids.view(1, -1)
    itself = torch.eye(len(pids), dtype=torch.bool, device=feats.device)
    closest_positive = dist.masked_fill(~same | itself, float("inf")).amin(1)
    if negatives is None:
        negatives = dist.masked_fill(same, float("-inf")).argmax(1)
    negatives = negatives.to(feats.device)
    to_negative = dist.gather(1, negatives.view(-1, 1)).view(-1)
    valid = torch.isfinite(closest_positive) & (pids[negatives] != pids)
    if not valid.any():
        return feats.sum() * 0.0, negatives
    return F.softplus(to_negative[valid] - closest_positive[valid]).mean(), negatives


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module):
    """Batch norms normalise with batch statistics but leave their running ones as they are."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


@DEFENSES.register("apd")
class APD(Defense):
    """APD (Tan et al. 2025): MPG-Net's hard samples, then SP-Net trained with SSD."""

    zoo_references = ("feature_net",)

    def __init__(self, feature_net: str = IMAGENET, metric_stage: int = 4, content_stage: int = 2,
                 negatives: int = 2, gen_width: int = 16, gen_blocks: int = 2, disc_width: int = 16,
                 eps_255: Optional[float] = None, mpg_steps: int = 500, mpg_batch: int = 16, mpg_lr: float = 2e-4,
                 mp_weight: float = 2.0, idem_weight: float = 1.0, content_weight: float = 1.0,
                 include_real: bool = True, k_weight: float = 1.0, nk_weight: float = 0.5,
                 k_star_weight: float = 0.1, nk_negative: str = "hardest", seed: int = 0):
        if isinstance(feature_net, dict):
            from reidbench.models.pretrained import check_spec

            if set(feature_net) != {"backbone", "pretrained"} or not isinstance(feature_net["backbone"], str):
                raise ReIDBenchError("defense 'apd': a feature_net mapping needs exactly backbone and pretrained "
                                     f"(a pinned ImageNet file), got {sorted(feature_net)}")
            check_spec(feature_net["pretrained"], "defense 'apd': feature_net")
        elif not isinstance(feature_net, str) or not feature_net:
            raise ReIDBenchError(f"defense 'apd': feature_net must be '{IMAGENET}', a zoo entry id or "
                                 f"{{backbone, pretrained}}, got {feature_net!r}")
        counts = dict(negatives=negatives, gen_width=gen_width, gen_blocks=gen_blocks, disc_width=disc_width,
                      mpg_steps=mpg_steps, mpg_batch=mpg_batch)
        small = sorted(k for k, v in counts.items() if not (isinstance(v, int) and v >= (0 if k == "gen_blocks" else 1)))
        if small:
            raise ReIDBenchError(f"defense 'apd': {', '.join(f'{k}={counts[k]}' for k in small)} must be "
                                 "a positive integer (gen_blocks may be 0)")
        if eps_255 is not None and not 0 < eps_255 <= 255:
            raise ReIDBenchError(f"defense 'apd': eps_255 must be in (0, 255] or null (no bound), got {eps_255}")
        if mpg_lr <= 0:
            raise ReIDBenchError(f"defense 'apd': mpg_lr must be > 0, got {mpg_lr}")
        weights = dict(mp_weight=mp_weight, idem_weight=idem_weight, content_weight=content_weight,
                       k_weight=k_weight, nk_weight=nk_weight, k_star_weight=k_star_weight)
        negative = sorted(k for k, v in weights.items() if v < 0)
        if negative:
            listing = ", ".join(f"{k}={weights[k]}" for k in negative)
            raise ReIDBenchError(f"defense 'apd': loss weights must be >= 0, got {listing}")
        if nk_negative not in NK_NEGATIVES:
            raise ReIDBenchError(f"defense 'apd': nk_negative must be one of {NK_NEGATIVES}, got {nk_negative!r}")
        super().__init__(feature_net=feature_net, metric_stage=int(metric_stage), content_stage=int(content_stage),
                         **{k: int(v) for k, v in counts.items()}, eps_255=eps_255, mpg_lr=float(mpg_lr),
                         **{k: float(v) for k, v in weights.items()}, include_real=bool(include_real),
                         nk_negative=nk_negative, seed=int(seed))
        self._partners: Optional[torch.Tensor] = None

    # --- stage 1 ---------------------------------------------------------------------------
    def feature_source(self, device: str = "cpu", progress: bool = True,
                       zoo: Optional[dict] = None) -> tuple[dict, Optional[tuple]]:
        """What decides ψ and φ (for the cache key) and, for an entry of ``zoo`` (the default zoo
        when None), (entry, weights file, recipe key the weights were trained under)."""
        name = self.params["feature_net"]
        if name == IMAGENET:
            return {"feature_net": "timm resnet50, ImageNet weights"}, None
        if isinstance(name, dict):  # ImageNet weights from a pinned file: the sha256 decides ψ and φ
            return {"feature_net": name["backbone"], "sha256": name["pretrained"]["sha256"]}, ("pretrained", name)
        from reidbench.errors import unknown_name
        from reidbench.cache import sha256_file
        from reidbench.zoo import load_zoo, obtain_weights, training_entry

        zoo = load_zoo() if zoo is None else zoo
        if name not in zoo:
            raise unknown_name("feature_net zoo entry (defense 'apd')", name, [IMAGENET, *zoo])
        entry = zoo[name]
        trained_as = training_entry(entry, zoo)
        if trained_as.defense.get("name") == "apd":
            raise ReIDBenchError(f"defense 'apd': feature_net '{name}' is itself trained with APD; "
                                 "name a model that does not need this one")
        path = obtain_weights(entry, None, True, device, progress, zoo)
        return {"feature_net": name, "sha256": sha256_file(path)}, (entry, path, trained_as.recipe_key())

    def feature_network(self, source: Optional[tuple]) -> FrozenFeatures:
        """ψ and φ, frozen."""
        p = self.params
        if source is None:
            try:
                model = ReIDModel("resnet50", pretrained=True, last_stride=2)
            except ReIDBenchError as exc:
                reason = str(exc).rsplit("; train from scratch", 1)[0]  # that hint is for backbones, not for ψ
                raise ReIDBenchError(
                    f"defense 'apd': feature_net '{IMAGENET}' needs timm's ImageNet resnet50 weights, which cannot be "
                    f"loaded here ({reason}); name a trained zoo entry instead, e.g. feature_net: resnet18-synthetic-none"
                ) from None
            return FrozenFeatures(model, p["metric_stage"], p["content_stage"], resize=False)
        if source[0] == "pretrained":
            spec = source[1]
            model = ReIDModel(spec["backbone"], pretrained=spec["pretrained"], last_stride=2)
            model.load_pretrained()
            return FrozenFeatures(model, p["metric_stage"], p["content_stage"], resize=False)
        from reidbench.models import build_model
        from reidbench.zoo import load_weights

        entry, path, recipe_key = source
        if path.suffix == ".onnx":
            raise ReIDBenchError(f"defense 'apd': feature_net '{entry.id}' is an ONNX model; it needs a timm backbone")
        model = build_model(entry.model_spec(), num_classes=0)
        load_weights(model, path, entry.id, recipe_key=recipe_key)
        return FrozenFeatures(model, p["metric_stage"], p["content_stage"])

    def build_mpg(self) -> tuple[MetricPerturbationGenerator, PatchDiscriminator]:
        p = self.params
        with torch.random.fork_rng(devices=[]):  # the networks' initialisation is their own, seeded
            torch.manual_seed(p["seed"])
            eps = None if p["eps_255"] is None else p["eps_255"] / 255.0
            return (MetricPerturbationGenerator(p["gen_width"], p["gen_blocks"], eps),
                    PatchDiscriminator(p["disc_width"]))

    def prepare_train(self, split, device: str = "cpu", zoo: Optional[dict] = None) -> ReIDSubset:
        generated = self.generated_set(split, device, zoo=zoo)
        parts = [split.train, generated] if self.params["include_real"] else [generated]
        return concat_subsets(parts, tuple(split.image_size))

    def generated_set(self, split, device: str = "cpu", progress: bool = True, zoo: Optional[dict] = None) -> ReIDSubset:
        """The "New Source Domain": G(x) for every training image of ``split``, with its source's
        labels (cached, as is the trained MPG-Net; see the module docstring). ``zoo`` holds a
        ``feature_net`` named by entry id (the default zoo when None)."""
        p = self.params
        train = split.train
        if train.num_ids < 2:
            raise ReIDBenchError(f"defense 'apd': MPG-Net needs negatives of other identities; '{split.name}' "
                                 f"trains on {train.num_ids} identity")
        described, source = self.feature_source(device, progress, zoo)
        key = _fingerprint({"split": split.split_hash, "size": list(split.image_size), "version": MPG_VERSION,
                            **described, **{k: p[k] for k in _MPG_KEYS}})
        root = cache_dir() / "apd"
        generated_path, mpg_path = root / f"generated-{key}.pt", root / f"mpg-{key}.safetensors"
        data = load_verified(generated_path, lambda p: torch.load(p, weights_only=True), "APD generated set")
        if data is not None:
            return ReIDSubset(data["pids"], data["camids"], images=data["images"])
        root.mkdir(parents=True, exist_ok=True)
        images = train.load_uint8(None, tuple(split.image_size))
        generator, discriminator = self.build_mpg()
        state = load_verified(mpg_path, lambda p: load_file(str(p)), "APD MPG-Net")
        if state is not None:
            generator.load_state_dict(state)
        else:
            started = time.time()
            history = train_mpg(generator, discriminator, self.feature_network(source), images, train.pids,
                                p["mpg_steps"], p["mpg_batch"], p["negatives"], p["mpg_lr"], p,
                                torch.Generator().manual_seed(p["seed"]), device, progress)
            tenth = max(1, len(history) // 10)
            head, tail = (sum(h["mpg"] for h in part) / len(part) for part in (history[:tenth], history[-tenth:]))
            log(f"apd: MPG-Net trained in {time.time() - started:.0f}s, mean L_MPG {head:.4f} over the first "
                f"{tenth} steps, {tail:.4f} over the last {tenth}")
            _atomic_safetensors(generator.state_dict(), mpg_path, {"history": json.dumps(history)})
        generator.to(device).eval()
        with torch.no_grad():
            hard = torch.cat([generator(chunk.to(device).float().div_(255)).mul_(255).round_().to(torch.uint8).cpu()
                              for chunk in images.split(64)])
        _atomic_torch_save({"images": hard, "pids": train.pids, "camids": train.camids}, generated_path)
        return ReIDSubset(train.pids, train.camids, images=hard)

    # --- stage 2 ---------------------------------------------------------------------------
    def training_batch(self, model, batch, generator):
        # Drawn here, from the loop's generator, so that a resumed run shuffles as an uninterrupted one.
        self._partners = shuffle_partners(batch.pids, generator)
        return batch.images

    def training_loss(self, model, batch, recipe):
        images, pids = batch.images, batch.pids
        if not isinstance(model, SemanticPurificationModel):
            raise ReIDBenchError("defense 'apd' trains the SP-Net model: give its zoo entry `model: {head: apd-split}`")
        partners, self._partners = self._partners, None
        if partners is None or len(partners) != len(pids):
            raise ReIDBenchError("defense 'apd': training_loss needs the shuffle of training_batch; call it first")
        p = self.params
        partners = partners.to(pids.device)
        identity, irrelevant = model.split(model.embedding_map(images))
        logits, feats = model.branch(identity)
        loss_k, logs = reid_terms(logits, feats, pids, recipe)
        with running_stats_frozen(model):
            logits_star, feats_star = model.branch(identity + irrelevant[partners])
            loss_k_star, logs_star = reid_terms(logits_star, feats_star, pids, recipe)
            logits_nk, feats_nk = model.branch(irrelevant)
        reversed_loss, negatives = reversed_triplet(feats_nk, pids, partners if p["nk_negative"] == "partner" else None)
        loss_nk = recipe.triplet_weight * reversed_loss
        logs.update({f"{k}_star": v for k, v in logs_star.items()}, nk_triplet=float(reversed_loss.detach()))
        if logits_nk is not None and recipe.ce_weight > 0:
            ce_nk = cross_entropy_label_smoothing(logits_nk, pids[negatives], recipe.label_smoothing)
            loss_nk = loss_nk + recipe.ce_weight * ce_nk
            logs["nk_ce"] = float(ce_nk.detach())
        loss = p["k_weight"] * loss_k + p["nk_weight"] * loss_nk + p["k_star_weight"] * loss_k_star
        logs.update(l_k=float(loss_k.detach()), l_nk=float(loss_nk.detach()), l_k_star=float(loss_k_star.detach()))
        return loss, logs
