"""Input-transform baselines: a standard model behind a transform applied at inference only.

* ``rrp``: random resize and pad (Xie et al., ICLR 2018); stochastic, so the protocol's
  white-box attacks average their gradients over its draws (EOT).
* ``jpeg``: JPEG re-encoding (Dziugaite et al. 2016; Guo et al., ICLR 2018);
  non-differentiable, so the protocol's white-box attacks go through it with BPDA.
"""

from __future__ import annotations

from reidbench.defense import Defense
from reidbench.errors import ReIDBenchError
from reidbench.registry import DEFENSES

from .transforms import DifferentiableJPEG, JPEGCompression, RandomResizePad


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
    """Standard training; JPEG re-encoding of every query and gallery image.

    ``bpda`` picks the backward pass white-box attacks use: ``differentiable`` (default) is
    :class:`DifferentiableJPEG` with Shin & Song's cubic rounding, the closest stand-in we
    have, so the adaptive numbers are not flattered by a weak one; ``identity`` is the
    straight-through BPDA of Athalye et al. (§4.1), kept to reproduce that reading. With the
    identity, 1/255 steps mostly fall inside JPEG's quantisation bins and the attacker never
    sees the quantiser (benchmarks/results/defenses.md)."""

    differentiable = False

    def __init__(self, quality: int = 75, bpda: str = "differentiable"):
        if bpda not in ("differentiable", "identity"):
            raise ReIDBenchError(f"defense 'jpeg': bpda must be 'differentiable' or 'identity', got {bpda!r}")
        super().__init__(quality=quality, bpda=bpda)
        JPEGCompression(quality)

    def input_transform(self):
        return JPEGCompression(self.params["quality"])

    def bpda_surrogate(self):
        if self.params["bpda"] == "identity":
            return None
        return DifferentiableJPEG(self.params["quality"])
