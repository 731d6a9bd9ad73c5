"""APD stage 1, MPG-Net: its losses, its generator and discriminator, the frozen feature network
ψ/φ they are measured with, and the GAN training loop (the package docstring says which parts
are the paper's and which ours)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from reidbench.errors import ReIDBenchError
from reidbench.models.reid_model import ReIDModel
from reidbench.progress import progress_bar


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
    """MPG-Net's G: image in [0, 1] -> hard matching sample in [0, 1] (package docstring)."""

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
