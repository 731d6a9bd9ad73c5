"""Building a model from a zoo entry's ``model`` mapping: the one place that chooses between the
image model, a defense's registered head and the tracklet model, so that none of them needs to
know the others."""

from __future__ import annotations

from ..errors import ReIDBenchError
from ..registry import MODEL_HEADS
from .reid_model import ReIDModel
from .video import VideoReIDModel


def build_model(spec: dict, num_classes: int = 0) -> ReIDModel:
    """Build a :class:`ReIDModel` from a zoo entry's ``model`` mapping. ``head: NAME`` builds
    the registered subclass ``MODEL_HEADS[NAME]`` instead (a defense's own model, e.g. APD's
    split head), which may accept the extra options it lists in ``options``. A ``video``
    option builds the tracklet model :class:`~reidbench.models.video.VideoReIDModel`."""
    # backbone_args go to timm.create_model as they are, e.g. {channels: [32, 64, 128, 256]}
    # for a narrower ResNet.
    spec = dict(spec)
    head = spec.pop("head", None)
    cls = ReIDModel if head is None else MODEL_HEADS.get(head)
    allowed = {"backbone", "pretrained", "last_stride", "pooling", "neck", "embedding", "input_size", "mean", "std",
               "backbone_args", "head", "video", *getattr(cls, "options", ())}
    unknown = set(spec) - allowed
    if unknown:
        raise ReIDBenchError(f"unknown model option(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
    if "video" in spec:
        if head is not None:
            raise ReIDBenchError(f"model head '{head}' is an image model; it cannot take the 'video' option")
        return VideoReIDModel(num_classes=num_classes, **spec)
    return cls(num_classes=num_classes, **spec)
