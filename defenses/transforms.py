"""Inference-time input transforms of the defenses, as ``nn.Module``s on images in [0, 1].

Each is batched and runs on whatever device its input is on. Whether an attacker may
differentiate through a transform is the transform's business: circuitous scaling is
differentiable; random resize-and-pad is differentiable but stochastic (the protocol
attacks it with EOT); JPEG is not differentiable (the protocol attacks it with BPDA).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reidbench.errors import ReIDBenchError

#: JAD's circuitous scaling at the paper's 256×128 input (Gong et al. 2022, §3.3, and the
#: reference test.py): 110×50 → 220×100 → 110×50, bicubic, then back to the input size.
JAD_SIZES_256x128 = ((110, 50), (220, 100), (110, 50))


class CircuitousScaling(nn.Module):
    """Down-, up- and down-scaling before the model (Gong et al., "Person re-identification
    method based on color attack and joint defence", CVPRW 2022, passive defense).

    The paper states pixel sizes for a 256×128 input. The most faithful reading for another
    input size keeps the ratios (110/256, 50/128, ...) to the input: the first step must
    *lose* resolution to wash out a perturbation, and 110×50 read literally would be an
    upscaling of a 64×32 CPU-scale input. ``sizes`` gives explicit (H, W) steps instead.
    Bicubic with anti-aliasing on the way down, as PIL's bicubic resize of the reference
    code does; the result is clipped to [0, 1] (bicubic overshoots, PIL saturates).
    Differentiable everywhere.
    """

    def __init__(self, sizes: Optional[Sequence[Sequence[int]]] = None, reference: tuple[int, int] = (256, 128),
                 antialias: bool = True):
        super().__init__()
        self.sizes = tuple(tuple(int(v) for v in s) for s in sizes) if sizes is not None else None
        self.reference = tuple(reference)
        self.antialias = bool(antialias)
        if self.sizes is not None and any(len(s) != 2 or min(s) < 1 for s in self.sizes):
            raise ReIDBenchError(f"circuitous scaling: sizes must be (H, W) pairs of positive ints, got {sizes!r}")

    def steps_for(self, height: int, width: int) -> list[tuple[int, int]]:
        if self.sizes is not None:
            return list(self.sizes)
        rh, rw = self.reference
        return [(max(1, round(h * height / rh)), max(1, round(w * width / rw))) for h, w in JAD_SIZES_256x128]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = x
        for size in self.steps_for(h, w) + [(h, w)]:
            y = F.interpolate(y, size=size, mode="bicubic", align_corners=False, antialias=self.antialias)
            y = y.clamp(0.0, 1.0)
        return y


class RandomResizePad(nn.Module):
    """Random resizing and padding (Xie et al., "Mitigating adversarial effects through
    randomization", ICLR 2018): resize to a random side in [s, s·``max_scale``) with s the
    input side, then zero-pad at a random offset to s·``max_scale``. Xie et al. use 299 →
    [299, 331) → 331, i.e. ``max_scale`` = 331/299 ≈ 1.107, and feed the larger image to
    the network; ReID backbones pool globally, so ours do too (``resize_back=True`` resizes
    to the input size for backbones that need a fixed size). Nearest-neighbour resizing as
    in the paper. Stochastic: the protocol attacks it with EOT."""

    stochastic = True

    def __init__(self, max_scale: float = 331 / 299, resize_back: bool = False, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not max_scale > 1.0:
            raise ReIDBenchError(f"rrp: max_scale must be > 1, got {max_scale}")
        self.max_scale = float(max_scale)
        self.resize_back = bool(resize_back)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out_h, out_w = int(round(h * self.max_scale)), int(round(w * self.max_scale))
        # One draw per batch: the resize is a single op; images of a batch share the size.
        scale = float(torch.rand((), generator=self.generator)) * (self.max_scale - 1.0) + 1.0
        new_h, new_w = min(out_h - 1, max(h, int(h * scale))), min(out_w - 1, max(w, int(w * scale)))
        resized = F.interpolate(x, size=(new_h, new_w), mode="nearest")
        top = int(torch.randint(0, out_h - new_h + 1, (), generator=self.generator))
        left = int(torch.randint(0, out_w - new_w + 1, (), generator=self.generator))
        padded = F.pad(resized, (left, out_w - new_w - left, top, out_h - new_h - top))
        if self.resize_back:
            padded = F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)
        return padded


class JPEGCompression(nn.Module):
    """JPEG re-encoding (Dziugaite et al. 2016; Guo et al., ICLR 2018, quality 75).

    Forward: a real baseline JPEG round trip through libjpeg (``torchvision.io``), per
    image, on the CPU. It has no useful gradient; the protocol attacks it with BPDA and the
    identity as the backward pass (Athalye et al., ICML 2018, §4.1: JPEG ≈ identity)."""

    differentiable = False

    def __init__(self, quality: int = 75):
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ReIDBenchError(f"jpeg: quality must be in [1, 100], got {quality}")
        self.quality = int(quality)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.io import decode_jpeg, encode_jpeg

        images = (x.detach() * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()
        decoded = [decode_jpeg(encode_jpeg(image, quality=self.quality)) for image in images]
        return torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255.0
