"""JAD, the joint adversarial defense of Gong et al., "Person re-identification method based on
color attack and joint defence" (CVPRW 2022), and its passive half alone.

* Proactive defense (training): per image, one draw among full grayscale (5%), channel fusion
  of RGB with grayscale or sketch channels (5% in total), an augmentation policy (5%), a
  local homogeneous transformation (10%), else the image is unchanged (75%). It teaches the
  model that colour is a nuisance, which is what the LTA colour attack exploits.
* Passive defense (inference): circuitous scaling of query and gallery images
  (:class:`defenses.transforms.CircuitousScaling`), its steps relative to the images' native
  size as the paper states them (``scaling_reference``, ``native_size``: see there).

``jad`` is both, ``jad-proactive`` the training half alone (the paper's ablation), ``cs`` the
scaling alone on top of a standard model.

Choices the paper leaves open, with what the reference code (finger-monkey/
LTA_and_joint-defence, multimodal.py) does:

* Branch probabilities: the issue/paper split above. The reference's own constructor call
  gives 1% + 1% to the two channel fusions; ``fusion_gray`` / ``fusion_sketch`` set them
  (default 2.5% each, 5% in total as the paper states).
* Channel fusion: the three output channels are the first three of a random permutation of
  (R, G, B, X, X), X the grayscale or sketch channel, as in the reference.
* Sketch: inverted grayscale, Gaussian blur, colour-dodge blend ``gray / (1 - blur)``. The
  reference blurs with a 27×27 kernel at 256×128, whose OpenCV sigma is 4.4 px; we keep
  the blur as a fraction of the image height (``sketch_sigma`` = 4.4/256) so that a 64×32
  image is blurred alike.
* Augmentation policy: torchvision's ImageNet AutoAugment policy, the list the reference's
  hand-written policy follows (25 sub-policies of two operations).
* Local homogeneous transformation: a rectangle of area U(0.02, 0.4) of the image and aspect
  ratio U(0.3, 1/0.3), as in random erasing, takes the same region of a transformed copy of
  the image: grayscale (20%), grayscale fusion (20%), sketch fusion (20%), augmentation policy
  (40%). The reference mixes up the rectangle's axes (a bug inherited from a random-erasing
  port); we draw height and width as the definition says.

The proactive transforms run on the batch after the shared loop's flip / crop / erasing (the
reference runs them before ToTensor, after flip and crop; erasing commutes with them up to
the erased rectangle's fill colour).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from reidbench.defense import Defense
from reidbench.errors import ReIDBenchError
from reidbench.registry import DEFENSES
from reidbench.train.augment import random_rectangles

from .transforms import JAD_NATIVE, CircuitousScaling

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of (B, 3, H, W) images."""
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding; kernel radius 3σ."""
    if sigma <= 0:
        return images
    radius = max(1, int(math.ceil(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    pad_h = min(radius, images.shape[-2] - 1)
    pad_w = min(radius, images.shape[-1] - 1)
    x = F.pad(images, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    x = F.conv2d(x, kernel[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, kernel[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def sketch(images: torch.Tensor, sigma_fraction: float = 4.4 / 256) -> torch.Tensor:
    """(B, 1, H, W) pencil sketch: colour dodge of the grayscale by its blurred inverse."""
    gray = grayscale(images)
    blurred = gaussian_blur(1.0 - gray, sigma_fraction * images.shape[-2])
    # gray * 256 / (255 - blur) in 8-bit units, saturated, as OpenCV's divide with scale 256.
    return (gray * (256.0 / 255.0) / (1.0 - blurred).clamp_min(1.0 / 255.0)).clamp(0.0, 1.0)


def channel_fusion(images: torch.Tensor, other: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, the first three of a random permutation of (R, G, B, X, X), X = ``other``."""
    pool = torch.cat([images, other, other], dim=1)  # (B, 5, H, W)
    order = torch.argsort(torch.rand(images.shape[0], 5, generator=generator), dim=1)[:, :3].to(images.device)
    return torch.gather(pool, 1, order.view(-1, 3, 1, 1).expand(-1, -1, *images.shape[-2:]))


def augmentation_policy(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision's ImageNet AutoAugment policy, one sub-policy drawn per image. Its own
    randomness is seeded from ``generator`` so that the batch is reproducible."""
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    policy = AutoAugment(AutoAugmentPolicy.IMAGENET)
    out = []
    seeds = torch.randint(0, 2**31 - 1, (images.shape[0],), generator=generator)
    with torch.random.fork_rng(devices=[]):
        for image, seed in zip(images, seeds):
            torch.manual_seed(int(seed))
            as_uint8 = (image.detach().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
            out.append(policy(as_uint8).to(images.device, images.dtype) / 255.0)
    return torch.stack(out) if out else images


def _gray_rgb(images: torch.Tensor) -> torch.Tensor:
    return grayscale(images).expand(-1, 3, -1, -1)


class ProactiveTransform:
    """JAD's per-image training transform. Callable on a (B, 3, H, W) batch in [0, 1] with a
    ``torch.Generator``; deterministic given the generator's state."""

    def __init__(self, gray: float = 0.05, fusion_gray: float = 0.025, fusion_sketch: float = 0.025,
                 policy: float = 0.05, local: float = 0.10, local_mix: tuple = (0.2, 0.2, 0.2, 0.4),
                 sketch_sigma: float = 4.4 / 256, local_area: tuple = (0.02, 0.4), local_ratio: float = 0.3):
        self.probs = torch.tensor([gray, fusion_gray, fusion_sketch, policy, local], dtype=torch.float64)
        if (self.probs < 0).any() or float(self.probs.sum()) > 1.0 + 1e-9:
            raise ReIDBenchError(f"jad: branch probabilities must be >= 0 and sum to at most 1, got {self.probs.tolist()}")
        self.local_mix = torch.tensor(local_mix, dtype=torch.float64)
        if len(local_mix) != 4 or (self.local_mix < 0).any() or abs(float(self.local_mix.sum()) - 1.0) > 1e-6:
            raise ReIDBenchError(f"jad: local_mix must be 4 shares summing to 1, got {list(local_mix)}")
        self.sketch_sigma = float(sketch_sigma)
        self.local_area, self.local_ratio = tuple(local_area), float(local_ratio)

    def _branch(self, images: torch.Tensor, kind: int, generator: torch.Generator) -> torch.Tensor:
        if kind == 0:
            return _gray_rgb(images)
        if kind == 1:
            return channel_fusion(images, grayscale(images), generator)
        if kind == 2:
            return channel_fusion(images, sketch(images, self.sketch_sigma), generator)
        return augmentation_policy(images, generator)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = images.shape
        cumulative = torch.cumsum(self.probs, 0)
        draw = torch.rand(b, generator=generator, dtype=torch.float64)
        # Branch 0..4 as above, 5 = unchanged.
        branch = torch.searchsorted(cumulative, draw, right=True)
        local_kind = torch.multinomial(self.local_mix, b, replacement=True, generator=generator)
        masks = random_rectangles(b, h, w, generator, self.local_area, self.local_ratio, images.device)
        out = images.clone()
        for kind in range(4):
            whole = (branch == kind).nonzero().flatten()
            if len(whole):
                out[whole] = self._branch(images[whole], kind, generator)
            local = ((branch == 4) & (local_kind == kind)).nonzero().flatten()
            if len(local):
                changed = self._branch(images[local], kind, generator)
                out[local] = torch.where(masks[local], changed, images[local])
        return out


def _scaling(params: dict, scaling_sizes, scaling_reference, native_size) -> CircuitousScaling:
    """The circuitous scaling of ``cs`` / ``jad``; its resolved settings go into ``params`` so
    that they enter every cell's key (a changed reading recomputes the cells)."""
    scaling = CircuitousScaling(scaling_sizes, scaling_reference, native_size)  # fail on bad sizes at build time
    if scaling_sizes is not None:
        params["scaling_sizes"] = scaling_sizes
    else:
        params["scaling_reference"] = list(scaling.reference)
        params["native_size"] = list(scaling.native) if scaling.native is not None else None
    return scaling


@DEFENSES.register("cs")
class CircuitousScalingDefense(Defense):
    """Circuitous scaling alone, on top of a standard model (JAD's passive half)."""

    def __init__(self, scaling_sizes=None, scaling_reference=JAD_NATIVE, native_size=None):
        super().__init__()
        self.scaling = _scaling(self.params, scaling_sizes, scaling_reference, native_size)

    def input_transform(self):
        return self.scaling


@DEFENSES.register("jad-proactive")
class JADProactive(Defense):
    """JAD's proactive training half alone (the paper's ablation): no scaling at inference.
    Keyword options are :class:`ProactiveTransform`'s."""

    def __init__(self, **proactive):
        super().__init__(**proactive)
        self.proactive = ProactiveTransform(**proactive)

    def training_batch(self, model, batch, generator):
        return self.proactive(batch.images, generator)


@DEFENSES.register("jad")
class JointAdversarialDefense(JADProactive):
    """Proactive colour transforms in training + circuitous scaling at inference (Gong et al. 2022)."""

    inference_params = ("scaling_sizes", "scaling_reference", "native_size")

    def __init__(self, scaling_sizes=None, scaling_reference=JAD_NATIVE, native_size=None, **proactive):
        super().__init__(**proactive)
        self.scaling = _scaling(self.params, scaling_sizes, scaling_reference, native_size)

    def input_transform(self):
        return self.scaling
