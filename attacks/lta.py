"""Local transformation attack (LTA) of Gong et al., "Person Re-identification Method Based
on Color Attack and Joint Defence" (CVPR 2022); reference code
finger-monkey/LTA_and_joint-defence (``torchattacks/attacks/LTA.py``, ``multimodal.LGPR``)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from reidbench.features import embed
from reidbench.registry import ATTACKS

from .iterative import IterativeMetricAttack

#: ITU-R 601-2 luma, the weights of PIL's ``convert("L")`` used by the reference.
LUMA = (0.299, 0.587, 0.114)


@ATTACKS.register("lta")
class LocalTransformationAttack(IterativeMetricAttack):
    """LTA (Gong et al. 2022): metric MI-FGSM whose guide is a locally grayscaled copy of the
    query, re-drawn at every iteration.

    * Guide: at each iteration, every clean query gets a fresh random rectangle converted to
      grayscale (the reference's ``LGPR(1)``: applied with probability 1; area a uniform
      fraction in [0.02, 0.4] of the image, aspect ratio h/w uniform in [0.3, 1/0.3],
      ``h = round(sqrt(area·r))``, ``w = round(sqrt(area/r))``, accepted when ``h < H`` and
      ``w < W``, top-left corner uniform over the positions that fit, up to 100 tries, else
      the image is left as is). Grayscale is the luma ``0.299 R + 0.587 G + 0.114 B`` written
      to the three channels. The guide is a transform of the CLEAN query, never of the
      adversarial image; its feature (``embed``, no gradient) is recomputed each iteration.
      Every draw comes from ``ctx.generator``.
    * Loss (ascended): the squared distance between the adversarial feature and the guide's
      feature: the attack pushes the query AWAY from its locally grayscaled self (the
      reference adds ``α·sign(g)`` for ``g`` the momentum of the gradient of ``MSELoss``).
    * Momentum 1 with the per-image mean-absolute-value normalisation (the shared loop), no
      random start; budget from the protocol (the reference uses ε = 5/255, α = 1/255 and
      15 steps, the same as protocol v1).

    Reference quirks:

    * ``LGPR`` mixes up PIL's ``(width, height)`` with numpy's ``(rows, cols)``: it tests
      ``h < width`` and ``w < height``, draws the top row in ``[0, height - w]`` and the left
      column in ``[0, width - h]``, and numpy slicing silently truncates the rectangle where it
      overflows. Default: the intended rectangle (``h`` rows, ``w`` columns, always inside);
      ``pil_axes=True`` reproduces the reference's placement and truncation.
    * The reference transforms only the first image of a batch (``img_gray[0] = ...``) and its
      loss sums the distances over every (adversarial, guide) pair of the batch; its script
      runs with batch size 1, where both are harmless. Here each query has its own guide and
      its own loss term (not exposed: it would make results depend on the batching).
    * The reference's guide goes through ``ToPILImage`` (uint8, truncated) and its grayscale is
      rounded to uint8; here the guide stays in float (differences below 1/255).
    """

    momentum = 1.0
    random_draws = True  # a fresh guide at every iteration
    uses_identity = False
    AREA = (0.02, 0.4)
    ASPECT = 0.3
    ATTEMPTS = 100

    def __init__(self, eps, step, iterations, seed=0, pil_axes: bool = False, **params):
        super().__init__(eps, step, iterations, seed, pil_axes=pil_axes, **params)

    def region(self, height: int, width: int, generator: torch.Generator) -> Optional[tuple[int, int, int, int]]:
        """``(top, left, rows, cols)`` of one random rectangle (clipped to the image), or None."""
        area = height * width
        for _ in range(self.ATTEMPTS):
            u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            target = (self.AREA[0] + (self.AREA[1] - self.AREA[0]) * u[0]) * area
            aspect = self.ASPECT + (1 / self.ASPECT - self.ASPECT) * u[1]
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if self.params["pil_axes"]:
                # PIL's size is (width, height): the reference compares and places h against the
                # width and w against the height, then slices rows with h and columns with w.
                if w < height and h < width:
                    left = int(torch.randint(0, width - h + 1, (1,), generator=generator))
                    top = int(torch.randint(0, height - w + 1, (1,), generator=generator))
                    return top, left, min(h, height - top), min(w, width - left)
            elif h < height and w < width:
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                return top, left, h, w
        return None

    def draw_guides(self, queries: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A locally grayscaled copy of each (clean) query."""
        height, width = queries.shape[-2:]
        luma = torch.tensor(LUMA, dtype=queries.dtype, device=queries.device).view(3, 1, 1)
        gray = (queries * luma).sum(-3, keepdim=True).expand_as(queries)
        # One rectangle per query; a video query (B, T, 3, H, W) has it on every frame.
        mask = torch.zeros(queries.shape[0], *([1] * (queries.dim() - 3)), height, width, dtype=torch.bool)
        for i in range(queries.shape[0]):
            box = self.region(height, width, generator)
            if box is not None:
                top, left, rows, cols = box
                mask[i, ..., top:top + rows, left:left + cols] = True
        return torch.where(mask.to(queries.device), gray, queries)

    def begin_iteration(self, model, queries, ctx, iteration):
        with torch.no_grad():
            ctx.extra["guide_feats"] = embed(model, self.draw_guides(queries, ctx.generator))
        return ctx

    def loss(self, feats, ctx):
        return (feats - ctx.extra["guide_feats"]).pow(2).sum(1)
