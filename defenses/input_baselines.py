"""Input-transform baselines: a standard model behind a transform applied at inference only.

* ``rrp``: random resize and pad (Xie et al., ICLR 2018); stochastic, so the protocol's
  white-box attacks average their gradients over its draws (EOT).
* ``jpeg``: JPEG re-encoding (Dziugaite et al. 2016; Guo et al., ICLR 2018);
  non-differentiable, so the protocol's white-box attacks go through it with BPDA.
"""

from __future__ import annotations

from reidbench.defense import Defense
from reidbench.registry import DEFENSES

from .transforms import JPEGCompression, RandomResizePad


@DEFENSES.register("rrp")
class RandomResizePadDefense(Defense):
    """Standard training; random resize-and-pad of every query and gallery image."""

    stochastic = True

    def __init__(self, max_scale: float = 331 / 299, resize_back: bool = False):
        super().__init__(max_scale=max_scale, resize_back=resize_back)
        RandomResizePad(max_scale, resize_back)  # fail on bad parameters at build time

    def input_transform(self):
        return RandomResizePad(**self.params)


@DEFENSES.register("jpeg")
class JPEGDefense(Defense):
    """Standard training; JPEG re-encoding of every query and gallery image (BPDA: identity)."""

    differentiable = False

    def __init__(self, quality: int = 75):
        super().__init__(quality=quality)
        JPEGCompression(quality)

    def input_transform(self):
        return JPEGCompression(**self.params)
