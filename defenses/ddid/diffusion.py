"""DDID's generator: a compact conditional DDPM (Ho et al., NeurIPS 2020) on pedestrian images.

A small UNet predicts the noise ε of a noised image from the time step and an identity
embedding (plus a camera embedding when the dataset has camera labels). Noise schedule: the
cosine schedule of Nichol & Dhariwal (ICML 2021), which behaves at any number of steps, so a
CPU preset with few steps and a GPU one with 1000 share the code. Sampling: DDIM (Song et
al., ICLR 2021) on an evenly spaced subsequence of the steps; η = 1 is the DDPM ancestral
sampler on that subsequence, η = 0 deterministic. Classifier-free guidance (Ho & Salimans,
2022): the condition is dropped to a learned null embedding with probability
``cond_dropout`` while training, and ``guidance`` s mixes ε = ε_∅ + s (ε_c − ε_∅) at sampling
(s = 1: plain conditional sampling, one network pass per step).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reidbench.errors import ReIDBenchError
from reidbench.progress import progress_bar


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) time steps (Vaswani et al., 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float().view(-1, 1) * freqs.view(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ConditionalUNet(nn.Module):
    """ε-prediction UNet: ``levels`` resolutions (channel multipliers of ``channels``), ``blocks``
    residual blocks per level, no attention. Index ``num_ids`` (``num_cameras``) of the
    embedding tables is the null condition of classifier-free guidance; ``num_cameras = 0``
    means no camera conditioning."""

    def __init__(self, num_ids: int, num_cameras: int = 0, channels: int = 32, levels: Sequence[int] = (1, 2),
                 blocks: int = 1):
        super().__init__()
        self.num_ids, self.num_cameras = int(num_ids), int(num_cameras)
        self.levels = tuple(int(m) for m in levels)
        emb = 4 * channels
        self.channels = channels
        self.time = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.ids = nn.Embedding(self.num_ids + 1, emb)
        self.cameras = nn.Embedding(self.num_cameras + 1, emb) if self.num_cameras else None
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        width, skips = channels, []
        for i, mult in enumerate(self.levels):
            for _ in range(blocks):
                self.down.append(_ResBlock(width, channels * mult, emb))
                width = channels * mult
                skips.append(width)
            last = i == len(self.levels) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.middle = _ResBlock(width, width, emb)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, mult in reversed(list(enumerate(self.levels))):
            for _ in range(blocks):
                self.up.append(_ResBlock(width + skips.pop(), channels * mult, emb))
                width = channels * mult
            self.upsample.append(nn.Identity() if i == 0 else nn.Conv2d(width, width, 3, padding=1))
        self.blocks = blocks
        self.head = nn.Sequential(nn.GroupNorm(_groups(width), width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))
        # A zero last layer starts the network at ε̂ = 0, the usual DDPM initialisation.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.levels) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, cameras: Optional[torch.Tensor] = None):
        emb = self.time(timestep_embedding(t, self.channels)) + self.ids(ids)
        if self.cameras is not None:
            emb = emb + self.cameras(cameras)
        h, skips = self.stem(x), []
        down = iter(self.down)
        for sample in self.downsample:
            for _ in range(self.blocks):
                h = next(down)(h, emb)
                skips.append(h)
            h = sample(h)
        h = self.middle(h, emb)
        up = iter(self.up)
        for sample in self.upsample:
            for _ in range(self.blocks):
                h = next(up)(torch.cat([h, skips.pop()], dim=1), emb)
            if not isinstance(sample, nn.Identity):
                h = sample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(h)


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ_t for t = 1..T of Nichol & Dhariwal's cosine schedule (β clipped at 0.999)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


class ConditionalDDPM:
    """The UNet, its noise schedule, training and sampling. Images are in [0, 1] outside and
    in [-1, 1] inside."""

    def __init__(self, net: ConditionalUNet, timesteps: int = 200, cond_dropout: float = 0.1):
        if timesteps < 2:
            raise ReIDBenchError(f"defense 'ddid': ddpm_timesteps must be >= 2, got {timesteps}")
        if not 0 <= cond_dropout < 1:
            raise ReIDBenchError(f"defense 'ddid': cond_dropout must be in [0, 1), got {cond_dropout}")
        self.net, self.timesteps, self.cond_dropout = net, int(timesteps), float(cond_dropout)
        self.alpha_bar = cosine_alpha_bar(self.timesteps)

    def loss(self, images: torch.Tensor, ids: torch.Tensor, cameras: Optional[torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        """The simple DDPM objective ‖ε − ε̂(x_t, t, c)‖² at a uniform t, with condition dropout."""
        device = images.device
        x0 = images * 2 - 1
        b = len(x0)
        t = torch.randint(0, self.timesteps, (b,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        a = self.alpha_bar[t].to(device).view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        drop = (torch.rand(b, generator=generator) < self.cond_dropout).to(device)
        ids = torch.where(drop, torch.full_like(ids, self.net.num_ids), ids)
        if self.net.cameras is not None:
            cameras = torch.where(drop, torch.full_like(cameras, self.net.num_cameras), cameras)
        return F.mse_loss(self.net(xt, t.to(device), ids, cameras), noise)

    def _epsilon(self, x, t, ids, cameras, guidance):
        if guidance == 1.0:
            return self.net(x, t, ids, cameras)
        null_ids = torch.full_like(ids, self.net.num_ids)
        null_cams = torch.full_like(cameras, self.net.num_cameras) if self.net.cameras is not None else None
        both = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ids, null_ids]),
                        torch.cat([cameras, null_cams]) if null_cams is not None else None)
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    @torch.no_grad()
    def sample(self, ids: torch.Tensor, cameras: Optional[torch.Tensor], size: tuple[int, int], steps: int = 50,
               eta: float = 1.0, guidance: float = 1.0, generator: Optional[torch.Generator] = None,
               batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W), of identities ``ids`` (class indices) seen by ``cameras``."""
        generator = generator or torch.Generator().manual_seed(0)
        device = next(self.net.parameters()).device
        self.net.eval()
        steps = max(1, min(int(steps), self.timesteps))
        # Evenly spaced steps from T-1 down to 0 ("trailing" spacing reaches t = T-1).
        schedule = torch.linspace(self.timesteps - 1, 0, steps).round().long().unique_consecutive()
        alpha_bar = self.alpha_bar.to(device)
        out = []
        with progress_bar(enabled=progress) as bar:
            task = bar.add_task("ddid: sample", total=len(ids))
            for start in range(0, len(ids), batch_size):
                idx = slice(start, start + batch_size)
                cid = ids[idx].to(device)
                cam = cameras[idx].to(device) if cameras is not None and self.net.cameras is not None else None
                x = torch.randn((len(cid), 3, *size), generator=generator).to(device)
                for i, t in enumerate(schedule):
                    a = alpha_bar[t]
                    a_prev = alpha_bar[schedule[i + 1]] if i + 1 < len(schedule) else torch.ones((), device=device)
                    eps = self._epsilon(x, t.expand(len(x)).to(device), cid, cam, guidance)
                    x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
                    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # consistent with the clipped x0
                    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
                    noise = torch.randn(x.shape, generator=generator).to(device)
                    x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * noise
                out.append(((x + 1) / 2).clamp(0, 1).cpu())
                bar.update(task, advance=len(cid))
        return torch.cat(out) if out else torch.zeros(0, 3, *size)


def train_ddpm(ddpm: ConditionalDDPM, images: torch.Tensor, ids: torch.Tensor, cameras: Optional[torch.Tensor],
               steps: int, batch_size: int, lr: float, generator: torch.Generator, ema: float = 0.999,
               device: str | torch.device = "cpu", progress: bool = True) -> list[float]:
    """Train on uint8 ``images`` (N, 3, H, W) for ``steps`` Adam steps of ``batch_size`` images
    drawn uniformly with horizontal flips (a pedestrian is itself mirrored). The network ends
    with the exponential moving average of its weights (decay ``ema``, warmed up as
    min(ema, (1 + k) / (10 + k)); 0 disables it), the weights DDPMs are sampled with.
    Returns the loss of every step."""
    device = torch.device(device)
    net = ddpm.net.to(device).train()
    h, w = images.shape[-2:]
    if h % net.divisor or w % net.divisor:
        raise ReIDBenchError(f"defense 'ddid': ddpm_size {h}x{w} must be divisible by {net.divisor} "
                             f"(2 to the number of levels minus one)")
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    average = {k: v.detach().clone() for k, v in net.state_dict().items()} if ema > 0 else None
    losses = []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("ddid: train DDPM", total=steps)
        for step in range(steps):
            index = torch.randint(0, len(images), (batch_size,), generator=generator)
            batch = images[index].float().div_(255.0)
            flip = torch.rand(batch_size, generator=generator) < 0.5
            batch[flip] = batch[flip].flip(-1)
            loss = ddpm.loss(batch.to(device), ids[index].to(device),
                             cameras[index].to(device) if cameras is not None else None, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                decay = min(ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for k, v in net.state_dict().items():
                        if v.dtype.is_floating_point:
                            average[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                        else:
                            average[k].copy_(v)
            losses.append(float(loss.detach()))
            bar.update(task, advance=1, description=f"ddid: train DDPM loss {losses[-1]:.4f}")
    if average is not None:
        net.load_state_dict(average)
    return losses
