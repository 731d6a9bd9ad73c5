"""Resize and Upsample: one separable implementation with ONNX's coordinate arithmetic, so
every mode and coordinate transformation is exact (``F.interpolate`` covers only some of them).
Each resized axis is gathered (nearest) or gathered and blended (linear, cubic) with index
and weight vectors computed from the sizes, so the result is differentiable in the image."""

from __future__ import annotations

import math

import torch

from ...errors import ReIDBenchError
from .args import floats, ints, optional


def _source_coordinates(out_size: int, in_size: int, scale: float, mode: str) -> torch.Tensor:
    dst = torch.arange(out_size, dtype=torch.float64)
    if mode == "half_pixel":
        return (dst + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (dst + 0.5) / scale - 0.5 if out_size > 1 else torch.zeros(out_size, dtype=torch.float64)
    if mode == "align_corners":
        return dst * (in_size - 1) / (out_size - 1) if out_size > 1 else torch.zeros(out_size, dtype=torch.float64)
    if mode == "asymmetric":
        return dst / scale
    if mode == "tf_half_pixel_for_nn":
        return (dst + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = out_size / (scale * in_size)
        return in_size / 2 * (1 - adjustment) + (dst + 0.5) / scale - 0.5
    raise ReIDBenchError(f"Resize coordinate_transformation_mode '{mode}' is not supported")


def _nearest_index(src: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    if mode == "simple":  # opset < 11: floor when enlarging, ceil when shrinking
        mode = "ceil" if scale < 1 else "floor"
    rounded = {"round_prefer_floor": lambda s: torch.ceil(s - 0.5), "round_prefer_ceil": lambda s: torch.floor(s + 0.5),
               "floor": torch.floor, "ceil": torch.ceil}[mode](src)
    return rounded.long()


def _cubic_weights(t: torch.Tensor, coefficient: float) -> list[torch.Tensor]:
    def kernel(d):
        d = d.abs()
        near = ((coefficient + 2) * d - (coefficient + 3)) * d * d + 1
        far = ((coefficient * d - 5 * coefficient) * d + 8 * coefficient) * d - 4 * coefficient
        return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))
    return [kernel(t - k) for k in (-1, 0, 1, 2)]


def _resize_axis(x: torch.Tensor, axis: int, out_size: int, scale: float, a: dict) -> torch.Tensor:
    in_size = x.shape[axis]
    src = _source_coordinates(out_size, in_size, scale, a["coordinate_transformation_mode"])
    mode = a.get("mode", "nearest")
    view = [1] * x.dim()
    view[axis] = out_size

    def taps(index):
        return torch.index_select(x, axis, index.clamp(0, in_size - 1).to(x.device))

    if mode == "nearest":
        return taps(_nearest_index(src, a.get("nearest_mode", "round_prefer_floor"), scale))
    if mode == "linear":
        src = src.clamp(0, in_size - 1)
        low = src.floor()
        weight = (src - low).to(x.dtype).to(x.device).view(view)
        low = low.long()
        return torch.lerp(taps(low), taps(low + 1), weight)
    if mode == "cubic":
        low = src.floor()
        weights = _cubic_weights(src - low, float(a.get("cubic_coeff_a", -0.75)))
        indices = [low.long() + k for k in (-1, 0, 1, 2)]
        if a.get("exclude_outside", 0):
            weights = [w * ((ix >= 0) & (ix < in_size)) for w, ix in zip(weights, indices)]
            total = sum(weights)
            weights = [w / total for w in weights]
        return sum(taps(ix) * w.to(x.dtype).to(x.device).view(view) for w, ix in zip(weights, indices))
    raise ReIDBenchError(f"Resize mode '{mode}' is not supported")


def resize(i, a):
    x = i[0]
    opset = a["_opset"]
    if a.get("antialias", 0):
        raise ReIDBenchError("Resize with antialias is not supported")
    a = dict(a)
    if a["_op"] == "Upsample" or opset < 11:  # Upsample and Resize-10: asymmetric coordinates
        a["coordinate_transformation_mode"], a["nearest_mode"] = "asymmetric", "simple"
        scales = floats(optional(i, 1)) or [float(s) for s in a.get("scales", [])]
        sizes: list[int] = []
    else:
        a.setdefault("coordinate_transformation_mode", "half_pixel")
        if a["coordinate_transformation_mode"] == "tf_crop_and_resize":
            raise ReIDBenchError("Resize coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
        scales, sizes = floats(optional(i, 2)), ints(optional(i, 3))
    if a.get("mode") == "bilinear":  # Upsample-7's name for it
        a["mode"] = "linear"
    axes = [ax % x.dim() for ax in a.get("axes", range(x.dim()))]
    if sizes:
        policy = a.get("keep_aspect_ratio_policy", "stretch")
        ratios = [sizes[k] / x.shape[ax] for k, ax in enumerate(axes)]
        if policy != "stretch":
            common = (min if policy == "not_larger" else max)(ratios)
            ratios = [common] * len(axes)
            sizes = [int(math.floor(common * x.shape[ax] + 0.5)) for ax in axes]
        scales = ratios
    else:
        sizes = [int(math.floor(x.shape[ax] * s)) for ax, s in zip(axes, scales)]
    for ax, size, scale in zip(axes, sizes, scales):
        if size != x.shape[ax] or scale != 1:
            x = _resize_axis(x, ax, size, scale, a)
    return [x]
