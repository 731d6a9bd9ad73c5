"""Deep mis-ranking (DMR) of Wang et al., "Transferable, Controllable, and Inconspicuous
Adversarial Attacks on Person Re-identification With Deep Mis-Ranking", CVPR 2020
(arXiv:2004.04199; reference code: github.com/whj363636/Adversarial-attack-on-Person-ReID-With-Deep-Mis-Ranking).

A generator is trained once against a surrogate ReID model on training images, then its
perturbation is added to the queries of any target model (a transfer attack). Training is
cached on disk per surrogate, training set and hyper-parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.utils.parametrizations import spectral_norm

from reidbench.attack import Attack, AttackContext, TrainView
from reidbench.cache import cache_dir, load_verified, save_safetensors, weights_fingerprint
from reidbench.data.sampler import PKSampler
from reidbench.errors import ReIDBenchError
from reidbench.features import embed, model_device
from reidbench.progress import progress_bar
from reidbench.registry import ATTACKS

#: bump when a change makes previously cached generators invalid
CACHE_VERSION = 1

#: MS-SSIM scale weights of Wang, Simoncelli & Bovik (Asilomar 2003), finest scale first
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# --- fingerprints -------------------------------------------------------------------------


def train_fingerprint(train: TrainView) -> dict:
    """What identifies a training view cheaply: its size, image size and labels (hashed)."""
    h = hashlib.sha256()
    h.update(train.subset.pids.numpy().tobytes())
    h.update(train.subset.camids.numpy().tobytes())
    return {"images": len(train.subset), "size": list(train.size), "labels": h.hexdigest()[:16]}


# --- losses -------------------------------------------------------------------------------


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ms_ssim_levels(height: int, width: int, window: int = 11) -> int:
    """Scales of MS-SSIM that fit an image: each halves the image and needs the whole window
    inside it (64×32 → 2 scales, 256×128 → 4), at most the 5 of the original definition."""
    levels, h, w = 0, height, width
    while levels < len(MS_SSIM_WEIGHTS) and min(h, w) >= window:
        levels, h, w = levels + 1, h // 2, w // 2
    return max(levels, 1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Multi-scale SSIM (Wang, Simoncelli & Bovik, 2003) per image, (B,), for images in [0, 1].

    The standard 11×11 Gaussian window (σ = 1.5) and constants K1 = 0.01, K2 = 0.03 with
    dynamic range 1; scales are 2×2 average-pooled. Only the scales whose image still holds
    the whole window are used (:func:`ms_ssim_levels`; an image smaller than the window gets
    one scale with the window shrunk to fit), and the weights of those scales are renormalised
    to sum to 1 so that the score stays in [0, 1]. Contrast-structure and SSIM terms are
    clamped at a small positive value before the fractional powers, as pytorch-msssim does,
    so that a negative correlation cannot produce NaN.
    """
    levels = ms_ssim_levels(x.shape[-2], x.shape[-1], window)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:levels], device=x.device, dtype=x.dtype)
    weights = weights / weights.sum()
    size = min(window, x.shape[-2], x.shape[-1])
    kernel = _gaussian_window(size, sigma, x.shape[1], x.device, x.dtype)
    c1, c2 = 0.01**2, 0.03**2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=t.shape[1])

    terms = []
    for level in range(levels):
        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x.pow(2)
        var_y = blur(y * y) - mu_y.pow(2)
        cov = blur(x * y) - mu_x * mu_y
        cs_map = (2 * cov + c2) / (var_x + var_y + c2)
        if level == levels - 1:
            ssim_map = (2 * mu_x * mu_y + c1) / (mu_x.pow(2) + mu_y.pow(2) + c1) * cs_map
            terms.append(ssim_map.flatten(1).mean(1))
        else:
            terms.append(cs_map.flatten(1).mean(1))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    values = torch.stack(terms, dim=1).clamp_min(1e-6)
    return values.pow(weights).prod(dim=1)


def _euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The clamp keeps the square root differentiable at zero distance (an image and its own
    # clean version before the generator has learnt anything).
    d2 = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2 * a @ b.t()
    return d2.clamp_min(1e-12).sqrt()


def mis_ranking_loss(adv_feats: torch.Tensor, clean_feats: torch.Tensor, pids: torch.Tensor,
                     margin: float) -> torch.Tensor:
    """Mean over anchors of ``[max_{j: other id} d(a_i, c_j) − min_{p: same id} d(a_i, c_p) + Δ]₊``.

    The adversarial triplet loss of Wang et al. (Eq. 2), inverted with respect to a ReID
    triplet loss: the *nearest* same-identity image is pushed beyond the *farthest*
    different-identity one plus the margin (Euclidean distances, as the reference code).
    Anchors ``a`` are adversarial features and the others ``c`` clean ones (the test
    setting: perturbed query, clean gallery); an anchor's own clean image is not among its
    same-identity images, as a query's own image is not in the gallery. Every anchor needs
    another image of its identity and one of another identity in the batch.
    """
    dist = _euclidean(adv_feats, clean_feats)
    same = pids.view(-1, 1) == pids.view(1, -1)
    self_pair = torch.eye(len(pids), dtype=torch.bool, device=dist.device)
    nearest_same = dist.masked_fill(~same | self_pair, math.inf).amin(1)
    farthest_other = dist.masked_fill(same, -math.inf).amax(1)
    return F.relu(farthest_other - nearest_same + margin).mean()


def lsgan_loss(predictions: list[torch.Tensor], real: bool) -> torch.Tensor:
    """Least-squares GAN loss (Mao et al., ICCV 2017) summed over the discriminator's scales."""
    target = 1.0 if real else 0.0
    return sum(F.mse_loss(p, torch.full_like(p, target)) for p in predictions)


# --- networks -----------------------------------------------------------------------------


class _ResnetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(dim, dim, 3, bias=False)), nn.BatchNorm2d(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(dim, dim, 3, bias=False)), nn.BatchNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MisRankingGenerator(nn.Module):
    """The ResNet generator of the reference code (Johnson et al., ECCV 2016 layout): 7×7
    conv, two stride-2 downsamplings, ``n_blocks`` residual blocks, two transposed-conv
    upsamplings, 7×7 conv and tanh; batch norm, spectral norm (Miyato et al., ICLR 2018) on
    every conv but the last.

    :meth:`perturbation` turns the tanh output ``t`` into a perturbation bounded by ``eps``:
    each (image, channel) is scaled by ``min(1, eps / max|t|)``, the reference's per-channel
    L∞ normalisation. With ``pixels`` set, a fourth output channel scores pixel locations and
    only the ``pixels`` best-scoring ones per image are perturbed (the paper's controllable
    number of attacked pixels).
    """

    def __init__(self, eps: float, ngf: int = 32, n_blocks: int = 6, pixels: Optional[int] = None):
        super().__init__()
        self.eps, self.pixels = float(eps), pixels
        layers = [nn.ReflectionPad2d(3), spectral_norm(nn.Conv2d(3, ngf, 7, bias=False)), nn.BatchNorm2d(ngf),
                  nn.ReLU(True)]
        for mult in (1, 2):
            layers += [spectral_norm(nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=False)),
                       nn.BatchNorm2d(ngf * mult * 2), nn.ReLU(True)]
        layers += [_ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [spectral_norm(nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
                                                        output_padding=1, bias=False)),
                       nn.BatchNorm2d(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3 + (pixels is not None), 7)]
        self.body = nn.Sequential(*layers)

    def perturbation(self, images: torch.Tensor) -> torch.Tensor:
        """A perturbation with ‖δ‖∞ ≤ eps for images in [0, 1], differentiable."""
        h, w = images.shape[-2:]
        # Two stride-2 stages need sides divisible by 4; reflect-pad and crop back otherwise.
        pad_h, pad_w = -h % 4, -w % 4
        x = F.pad(images * 2 - 1, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else images * 2 - 1
        out = self.body(x)[..., :h, :w]
        t = torch.tanh(out[:, :3])
        peak = t.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        delta = t * (self.eps / peak).clamp(max=1.0)
        if self.pixels is None:
            return delta
        # Hard top-k mask in the forward pass, softmax gradient in the backward pass (the
        # straight-through estimator the reference's Gumbel top-k uses).
        scores = out[:, 3].flatten(1)
        soft = scores.softmax(dim=1)
        hard = torch.zeros_like(soft).scatter_(1, scores.topk(min(self.pixels, h * w), dim=1).indices, 1.0)
        mask = (hard + soft - soft.detach()).view(-1, 1, h, w)
        return delta * mask


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    # TensorFlow "SAME" padding (output side = ceil(side / stride)), as the reference uses, so
    # that the coarse scales of a 64×32 image still give a patch map.
    pads = []
    for side in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(side / stride) - 1) * stride + kernel - side, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class _PatchDiscriminator(nn.Module):
    """One scale of the discriminator: a PatchGAN (Isola et al., CVPR 2017) on 6-channel
    (reference image, candidate image) pairs, spectral-normalised 4×4 convs."""

    def __init__(self, ndf: int, n_layers: int = 3):
        super().__init__()
        self.convs, self.strides = nn.ModuleList(), []
        channels = [6] + [min(ndf * 2**i, 512) for i in range(n_layers + 1)]
        for i in range(n_layers + 1):
            stride = 2 if i < n_layers else 1
            norm = nn.Identity() if i == 0 else nn.BatchNorm2d(channels[i + 1])
            self.convs.append(nn.Sequential(spectral_norm(nn.Conv2d(channels[i], channels[i + 1], 4, stride=stride)),
                                            norm, nn.LeakyReLU(0.2, True)))
            self.strides.append(stride)
        self.convs.append(nn.Conv2d(channels[-1], 1, 4))
        self.strides.append(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, stride in zip(self.convs, self.strides):
            x = conv(_same_pad(x, 4, stride))
        return x


class MultiStageDiscriminator(nn.Module):
    """The reference's multi-stage discriminator: ``num_scales`` PatchGANs applied to an
    image pyramid (3×3 average pooling, stride 2), each answering on its own stage; the GAN
    loss sums over them. The reference additionally fuses the stages' intermediate features
    into its pixel mask; here the mask lives in the generator (see :class:`MisRankingGenerator`)."""

    def __init__(self, ndf: int = 64, num_scales: int = 3):
        super().__init__()
        self.scales = nn.ModuleList(_PatchDiscriminator(ndf) for _ in range(num_scales))

    def forward(self, reference: torch.Tensor, candidate: torch.Tensor) -> list[torch.Tensor]:
        x = torch.cat([reference, candidate], dim=1)
        out = []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(_same_pad(x, 3, 2), 3, stride=2)
            out.append(d(x))
        return out


# --- the attack ---------------------------------------------------------------------------


@ATTACKS.register("dmr")
class DeepMisRanking(Attack):
    """Deep mis-ranking (Wang et al., CVPR 2020): a generator G, trained against the
    surrogate on its training images, perturbs every query in one forward pass.

    G's loss, as in the reference ``train.py``:
    ``L_G = L_GAN + reid_factor · log L_mis-rank + ssim_weight · (1 − MS-SSIM(x, x + δ))``
    with the least-squares GAN loss against the multi-stage discriminator D, the
    mis-ranking triplet loss (:func:`mis_ranking_loss`, margin Δ) on the surrogate's
    L2-normalised embeddings, and MS-SSIM (:func:`ms_ssim`). D learns to tell
    ``(x, x + δ)`` (fake) from pairs of two different clean images (real), the reference's
    pairing. Both use Adam (lr 2e-4, β₁ = 0.5) on P×K identity batches (Hermans et al., 2017).

    Defaults are the paper's: ngf = 32, 6 residual blocks, ndf = 64 with 3 scales, Δ = 0.3,
    reid_factor = 10, ssim_weight = 0.1, batch 32 (P = 8 identities × K = 4 images). The
    paper trains 50 epochs of Market-1501 (an epoch is 751 identities × 4 images, so ≈ 4 700
    steps at batch 32, on a GPU); ``train_steps`` defaults to a CPU-sized 300. ``pixels``
    (default off) restricts the perturbation to that many pixel locations per image.

    Deviations from the reference, and why:

    * only the mis-ranking (metric) loss attacks the surrogate: the reference adds an
      adversarial cross-entropy on the classifier logits, which a benchmark surrogate does
      not expose (it returns embeddings only);
    * the triplet's positives and negatives are *clean* features and only the anchor is
      adversarial, matching the benchmark's threat model (perturbed query, clean gallery).
      The reference perturbs all three, and because its same-identity minimum includes the
      anchor itself (distance 0) its push-apart term vanishes; here the anchor's own image
      is excluded;
    * the ε-bound is applied in pixel units and is differentiable; the reference rescales
      in normalised units through ``.data``, hiding the rescaling from the gradient;
    * the pixel mask is a head of G (straight-through top-k) instead of a head of D, so that
      applying the attack needs G alone;
    * no training augmentation (the reference uses its target's random crops and flips),
      which keeps training a function of the seed alone;
    * PyTorch's default initialisation instead of the reference's N(0, 1) conv weights.

    ``step`` and ``iterations`` of the protocol do not apply (G is a feed-forward
    attacker); they are recorded but unused. ``model`` (the target) is never queried.
    """

    threat_model = "transfer"
    needs = ("surrogate", "train")

    def __init__(self, eps, step, iterations, seed=0, train_steps: int = 300, ngf: int = 32, n_blocks: int = 6,
                 ndf: int = 64, num_scales: int = 3, margin: float = 0.3, reid_factor: float = 10.0,
                 ssim_weight: float = 0.1, lr: float = 2e-4, beta1: float = 0.5, batch_p: int = 8, batch_k: int = 4,
                 pixels: Optional[int] = None):
        if train_steps < 1:
            raise ReIDBenchError(f"attack 'dmr': train_steps must be >= 1, got {train_steps}")
        if batch_p < 2 or batch_k < 2:
            raise ReIDBenchError(f"attack 'dmr': the mis-ranking loss needs batch_p >= 2 identities of batch_k >= 2 "
                                 f"images, got {batch_p} x {batch_k}")
        if pixels is not None and pixels < 1:
            raise ReIDBenchError(f"attack 'dmr': pixels must be >= 1 or unset, got {pixels}")
        super().__init__(eps, step, iterations, seed, train_steps=int(train_steps), ngf=int(ngf),
                         n_blocks=int(n_blocks), ndf=int(ndf), num_scales=int(num_scales), margin=float(margin),
                         reid_factor=float(reid_factor), ssim_weight=float(ssim_weight), lr=float(lr),
                         beta1=float(beta1), batch_p=int(batch_p), batch_k=int(batch_k), pixels=pixels)
        self._generators: dict[str, MisRankingGenerator] = {}

    # -- construction and caching --

    def build_generator(self) -> MisRankingGenerator:
        """G at its seeded initialisation (also what training starts from)."""
        p = self.params
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return MisRankingGenerator(self.eps, p["ngf"], p["n_blocks"], p["pixels"])

    def build_discriminator(self) -> MultiStageDiscriminator:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            return MultiStageDiscriminator(self.params["ndf"], self.params["num_scales"])

    def cache_key(self, ctx: AttackContext) -> dict:
        """Everything the trained generator depends on."""
        return {"version": CACHE_VERSION, "surrogate": ctx.surrogate.entry_id,
                "surrogate_weights": weights_fingerprint(ctx.surrogate.model), "train": train_fingerprint(ctx.train),
                "eps": self.eps, "seed": self.seed, **self.params}

    def cache_path(self, key: dict):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return cache_dir() / "attacks" / "dmr" / f"{digest}.safetensors"

    def generator(self, ctx: AttackContext) -> MisRankingGenerator:
        """The trained G for this context's surrogate: from memory, from disk, or trained now."""
        if ctx.surrogate is None or ctx.train is None:
            raise ReIDBenchError("attack 'dmr' needs a surrogate model and training images in its context")
        key = self.cache_key(ctx)
        path = self.cache_path(key)
        if path.name in self._generators:
            return self._generators[path.name]
        device = model_device(ctx.surrogate.model)
        state = load_verified(path, lambda p: load_file(str(p)), "DMR generator")
        if state is not None:
            g = self.build_generator()
            g.load_state_dict(state)
        else:
            g = self._train_generator(ctx.surrogate.model, ctx.train, device)
            save_safetensors(g.state_dict(), path, metadata={"key": json.dumps(key, sort_keys=True, default=str)})
        g = g.to(device).eval()
        self._generators[path.name] = g
        return g

    # -- training --

    def _train_generator(self, surrogate: nn.Module, train: TrainView, device: torch.device) -> MisRankingGenerator:
        p = self.params
        surrogate.eval()
        g, d = self.build_generator().to(device).train(), self.build_discriminator().to(device).train()
        opt_g = torch.optim.Adam(g.parameters(), lr=p["lr"], betas=(p["beta1"], 0.999))
        opt_d = torch.optim.Adam(d.parameters(), lr=p["lr"], betas=(p["beta1"], 0.999))
        sampler = PKSampler(train.subset.pids, p=p["batch_p"], k=p["batch_k"], seed=self.seed)
        batches, epoch = iter(()), -1
        with progress_bar() as bar:
            task = bar.add_task("dmr: training the generator", total=p["train_steps"])
            for _ in range(p["train_steps"]):
                index = next(batches, None)
                if index is None:
                    epoch += 1
                    sampler.set_epoch(epoch)
                    batches = iter(sampler)
                    index = next(batches)
                x = train.subset.load(index, train.size).to(device)
                pids = train.subset.pids[index].to(device)
                with torch.no_grad():
                    clean = embed(surrogate, x)
                adv = (x + g.perturbation(x)).clamp(0, 1)
                # One discriminator pass on the fakes serves both players: G's loss reads it
                # with the target "real", D's with "fake" (the reference runs D twice on the
                # same pairs with the same weights).
                fake = d(x, adv)
                half = len(x) // 2
                real = d(x[:half], x[half:2 * half])

                loss_rank = mis_ranking_loss(embed(surrogate, adv), clean, pids, p["margin"])
                loss_ssim = (1 - ms_ssim(x, adv)).mean()
                # The reference takes the log of the hinge, which keeps its gradient alive as it shrinks.
                loss_g = (lsgan_loss(fake, real=True) + p["reid_factor"] * loss_rank.clamp_min(1e-12).log()
                          + p["ssim_weight"] * loss_ssim)
                loss_d = (lsgan_loss(fake, real=False) + lsgan_loss(real, real=True)) / 2
                # autograd.grad, not backward: each player gets the gradient of its own loss only,
                # and the surrogate's parameters collect nothing.
                g_params, d_params = list(g.parameters()), list(d.parameters())
                for param, grad in zip(g_params, torch.autograd.grad(loss_g, g_params, retain_graph=True)):
                    param.grad = grad
                for param, grad in zip(d_params, torch.autograd.grad(loss_d, d_params)):
                    param.grad = grad
                opt_g.step()
                opt_d.step()
                bar.update(task, advance=1, description=f"dmr: mis-rank {loss_rank.item():.3f}")
        return g

    # -- attack --

    def perturb(self, model, queries, ctx):
        g = self.generator(ctx)
        with torch.no_grad():
            delta = g.perturbation(queries.to(model_device(g)))
        return (queries + delta.to(queries.device)).clamp(0, 1)
