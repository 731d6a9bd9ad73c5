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

#: JAD's circuitous scaling (Gong et al. 2022, §3.3, and the reference test.py): Market-1501's
#: native 128×64 images go 110×50 → 220×100 → 110×50, bicubic, before the resize to the input.
JAD_NATIVE = (128, 64)
JAD_STEPS = ((110, 50), (220, 100), (110, 50))


class CircuitousScaling(nn.Module):
    """Down-, up- and down-scaling before the model (Gong et al., "Person re-identification
    method based on color attack and joint defence", CVPRW 2022, passive defense).

    The paper states its steps in pixels for Market-1501's native 128×64 images: down to
    110×50 (≈ 0.86 of the native size), up to 220×100, down to 110×50; the reference code
    applies them to the native image and only then resizes to its 256×128 input. For other
    images the ratios are kept relative to the image's *native* size (``reference`` is the
    size the paper's steps are stated for). ``native`` is the size the input was resized
    from; None (default) takes the input as native, as the synthetic data is (64×32 →
    55×25 → 110×50 → 55×25). A Market image fed at 256×128 sets ``native=(128, 64)`` and gets
    the reference's 110×50 → 220×100 → 110×50. Each step is then resized back to the input
    size. ``sizes`` gives explicit (H, W) steps instead.

    Before protocol v2 the ratios were taken relative to the reference's 256×128 *input*,
    which at a 64×32 input gives 28×12 → 55×25 → 28×12, twice the paper's downscaling;
    ``reference=(256, 128)`` restores that reading.

    Bicubic with anti-aliasing on the way down, as PIL's bicubic resize of the reference
    code does; the result is clipped to [0, 1] (bicubic overshoots, PIL saturates).
    Differentiable everywhere.
    """

    def __init__(self, sizes: Optional[Sequence[Sequence[int]]] = None, reference: Sequence[int] = JAD_NATIVE,
                 native: Optional[Sequence[int]] = None, antialias: bool = True):
        super().__init__()
        self.sizes = tuple(tuple(int(v) for v in s) for s in sizes) if sizes is not None else None
        self.antialias = bool(antialias)
        if self.sizes is not None and any(len(s) != 2 or min(s) < 1 for s in self.sizes):
            raise ReIDBenchError(f"circuitous scaling: sizes must be (H, W) pairs of positive ints, got {sizes!r}")
        for name, value in (("reference", reference), ("native", native)):
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise ReIDBenchError(f"circuitous scaling: {name} must be an (H, W) pair of positive ints, got {value!r}")
        self.reference = tuple(int(v) for v in reference)
        self.native = tuple(int(v) for v in native) if native is not None else None

    def steps_for(self, height: int, width: int) -> list[tuple[int, int]]:
        if self.sizes is not None:
            return list(self.sizes)
        nh, nw = self.native or (height, width)
        rh, rw = self.reference
        return [(max(1, round(h * nh / rh)), max(1, round(w * nw / rw))) for h, w in JAD_STEPS]

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
    image, on the CPU. It has no useful gradient; the protocol attacks it with BPDA, whose
    backward pass is :class:`DifferentiableJPEG` or the identity (Athalye et al., ICML 2018,
    §4.1: JPEG ≈ identity), as the ``jpeg`` defense chooses."""

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


#: JPEG's example quantisation tables (ITU-T T.81, Annex K, tables K.1 and K.2), row-major.
_LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def jpeg_quant_table(base: Sequence[int], quality: int) -> torch.Tensor:
    """The (8, 8) table libjpeg uses at ``quality`` (the IJG scaling of ``jpeg_set_quality``)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    table = (torch.tensor(base, dtype=torch.float64) * scale + 50).div(100).floor().clamp(1, 255)
    return table.view(8, 8)


def _dct_matrix() -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float64)
    matrix = torch.cos((2 * n[None, :] + 1) * n[:, None] * torch.pi / 16) * (2 / 8) ** 0.5
    matrix[0] /= 2 ** 0.5
    return matrix  # orthonormal DCT-II: coefficients = M @ block @ M.T


class DifferentiableJPEG(nn.Module):
    """A differentiable model of libjpeg's baseline round trip, the BPDA surrogate of
    :class:`JPEGCompression` (Shin & Song, "JPEG-resistant adversarial images", NeurIPS 2017
    workshop; Athalye et al., ICML 2018, §4.1 name it as the better approximation).

    The codec's steps: RGB → YCbCr (JFIF), chroma 2×2 box subsampling (``subsampling``; the
    4:2:0 of libjpeg's defaults), level shift, 8×8 block DCT, division by the quality-scaled
    Annex K tables, rounding, and back (chroma upsampled bilinearly, where libjpeg uses its
    "fancy" triangle filter). Rounding is ``rounding``: ``cubic`` is Shin & Song's
    ``⌊x⌉ + (x − ⌊x⌉)³`` (the true value forward, a gradient that vanishes near integers
    but not everywhere), ``linear`` is straight-through (gradient 1). Edges are padded by
    replication to whole blocks, as libjpeg does, and cropped back.
    """

    def __init__(self, quality: int = 75, subsampling: bool = True, rounding: str = "cubic"):
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ReIDBenchError(f"jpeg: quality must be in [1, 100], got {quality}")
        if rounding not in ("cubic", "linear"):
            raise ReIDBenchError(f"differentiable JPEG: rounding must be 'cubic' or 'linear', got {rounding!r}")
        self.quality, self.subsampling, self.rounding = int(quality), bool(subsampling), rounding
        self.register_buffer("dct", _dct_matrix().float(), persistent=False)
        self.register_buffer("luma", jpeg_quant_table(_LUMA_TABLE, self.quality).float(), persistent=False)
        self.register_buffer("chroma", jpeg_quant_table(_CHROMA_TABLE, self.quality).float(), persistent=False)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        rounded = torch.round(x).detach()
        if self.rounding == "cubic":
            return rounded + (x - rounded) ** 3
        return x + (rounded - x).detach()

    def _codec(self, plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Quantise one (N, h, w) plane, h and w multiples of 8, in 0..255 units."""
        n, h, w = plane.shape
        blocks = (plane - 128).view(n, h // 8, 8, w // 8, 8).transpose(2, 3)
        coefficients = self.dct @ blocks @ self.dct.T
        coefficients = self._round(coefficients / table) * table
        blocks = self.dct.T @ coefficients @ self.dct
        return blocks.transpose(2, 3).reshape(n, h, w) + 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        unit = 16 if self.subsampling else 8
        pad = (0, -width % unit, 0, -height % unit)
        rgb = F.pad(x.float() * 255, pad, mode="replicate") if any(pad) else x.float() * 255
        r, g, b = rgb.unbind(1)
        y = 0.299 * r + 0.587 * g + 0.114 * b
        cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
        cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
        y = self._codec(y, self.luma)
        chroma = torch.stack([cb, cr], 1)
        if self.subsampling:
            chroma = F.avg_pool2d(chroma, 2)
        n, _, h, w = chroma.shape
        chroma = self._codec(chroma.reshape(n * 2, h, w), self.chroma).view(n, 2, h, w)
        if self.subsampling:
            chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
        cb, cr = chroma[:, 0] - 128, chroma[:, 1] - 128
        out = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
        out = out[..., :height, :width] / 255
        return out.clamp(0, 1).to(x.dtype)
