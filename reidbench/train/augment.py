"""Batched training augmentations on float images in [0, 1] (flip, pad-and-crop, random
erasing as in the ReID "bag of tricks"), vectorized so they cost nothing next to the model.

Each takes (B, 3, H, W) images or (B, T, 3, H, W) tracklets; a tracklet is augmented as one
sample (the same flip, crop and erased rectangle on every frame), so its motion is kept."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    out = images.clone()
    out[flip] = images[flip].flip(-1)
    return out


def random_pad_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` pixels and crop back at a random offset per image."""
    if pad <= 0:
        return images
    if images.dim() != 4:  # a tracklet: crop its frames alike, as channels of one sample
        return random_pad_crop(images.flatten(1, -3), pad, generator).view_as(images)
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).to(images.device)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).to(images.device)
    batch = torch.arange(b, device=images.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2).contiguous()


def random_rectangles(b: int, h: int, w: int, generator: torch.Generator, area: tuple[float, float] = (0.02, 0.4),
                      ratio: float = 0.3, device=None) -> torch.Tensor:
    """(B, 1, H, W) boolean masks of one rectangle each, of random area (a fraction of the
    image in ``area``) and log-uniform aspect in [ratio, 1/ratio], as in random erasing."""
    target_area = torch.empty(b).uniform_(*area, generator=generator) * h * w
    aspect = torch.exp(torch.empty(b).uniform_(math.log(ratio), math.log(1 / ratio), generator=generator))
    eh = (target_area * aspect).sqrt().round().clamp(1, h).long()
    ew = (target_area / aspect).sqrt().round().clamp(1, w).long()
    y0 = (torch.rand(b, generator=generator) * (h - eh + 1)).long()
    x0 = (torch.rand(b, generator=generator) * (w - ew + 1)).long()
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    mask = (ys >= y0.view(b, 1, 1)) & (ys < (y0 + eh).view(b, 1, 1)) & (xs >= x0.view(b, 1, 1)) & (xs < (x0 + ew).view(b, 1, 1))
    return mask.unsqueeze(1).to(device)


def random_erasing(
    images: torch.Tensor, probability: float, generator: torch.Generator,
    area: tuple[float, float] = (0.02, 0.4), ratio: float = 0.3,
) -> torch.Tensor:
    """Random erasing (Zhong et al., AAAI 2020): a rectangle of random size and aspect
    filled with the per-channel ImageNet mean, so the normalized input there is ~0."""
    if probability <= 0:
        return images
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    fill = torch.tensor((0.485, 0.456, 0.406), device=images.device).view(3, 1, 1)
    apply = torch.rand(b, generator=generator) < probability
    mask = random_rectangles(b, h, w, generator, area, ratio, images.device) & apply.view(b, 1, 1, 1).to(images.device)
    # (B, 1, H, W) -> (B, 1, ..., 1, H, W): one rectangle per sample, on every frame of a tracklet
    mask = mask.view(b, *([1] * (images.dim() - 3)), h, w)
    return torch.where(mask, fill, images)
