"""Video ReID: a per-frame backbone and a spatial-temporal relation module that turns a
tracklet (B, T, 3, H, W) in [0, 1] into one (B, D) embedding.

The relation module is our reading of the "spatial-temporal information-guided feature
representation network" of Li et al., "Adversarial Self-Attack Defense and Spatial-Temporal
Relation Mining for Visible-Infrared Video Person Re-Identification" (arXiv:2307.03903,
2023), which "extracts the information of the video-frame sequence and uses the relation of
the local information in space to guide the network to extract more robust features". The
paper gives no code; the architecture below is ours, each choice a parameter:

1. **Local parts.** Each frame's feature map (C, h, w) is cut into ``parts`` horizontal
   stripes, average-pooled: tokens ``x[t, k]`` (T·P tokens of C channels per tracklet).
2. **Spatial-temporal relations.** Every token attends to every token of the tracklet (all
   parts of all frames): ``softmax(q·kᵀ/√d)`` with ``q, k`` linear maps to
   ``d = C / reduction``; the attended mixture of tokens is added back with a learnable gate
   ``gamma`` initialised at 0 (so training starts from plain pooling). A part thus sees the
   same body region in the other frames and the other regions of its frame.
3. **Relation-guided aggregation.** Per part, frames are weighted by ``softmax_t`` of a
   learned score of the refined token (an occluded or blurred frame of a part scores low)
   and summed; the tracklet feature is the mean over parts (C channels, so the BNNeck, the
   classifier and the embedding size are those of the image model).

The backbone, BNNeck and classifier are :class:`~reidbench.models.ReIDModel`'s and are
shared by both modalities (infrared frames are 3-channel replicated intensity). Modality-
specific first layers are not used: the deployed model would need the query's modality at
inference, which an attacker-facing embedding function does not take. An image batch
(B, 3, H, W) is a tracklet of one frame.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ReIDBenchError
from .reid_model import ReIDModel


class SpatialTemporalRelation(nn.Module):
    """(B, T, C, h, w) frame maps -> (B, C) tracklet features (see the module docstring)."""

    def __init__(self, channels: int, parts: int = 4, reduction: int = 8):
        super().__init__()
        if parts < 1 or reduction < 1:
            raise ReIDBenchError(f"video model: parts and reduction must be >= 1, got {parts}, {reduction}")
        self.parts = int(parts)
        dim = max(1, channels // int(reduction))
        self.query = nn.Linear(channels, dim, bias=False)
        self.key = nn.Linear(channels, dim, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))
        self.score = nn.Linear(channels, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def part_tokens(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, T, C, h, w) -> (B, T, P, C): the mean of each horizontal stripe."""
        b, t, c, h, w = maps.shape
        stripes = F.adaptive_avg_pool2d(maps.reshape(b * t, c, h, w), (self.parts, 1))
        return stripes.view(b, t, c, self.parts).transpose(2, 3)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        tokens = self.part_tokens(maps)
        b, t, p, c = tokens.shape
        flat = tokens.reshape(b, t * p, c)
        q, k = self.query(flat), self.key(flat)
        attention = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        refined = (flat + self.gamma * (attention @ flat)).view(b, t, p, c)
        weights = torch.softmax(self.score(refined), dim=1)  # over frames, per part
        return (weights * refined).sum(1).mean(1)


class VideoReIDModel(ReIDModel):
    """:class:`ReIDModel` on tracklets: per-frame backbone, :class:`SpatialTemporalRelation`
    instead of global pooling, then the same BNNeck. ``forward`` in eval mode maps
    (B, T, 3, H, W) in [0, 1] to (B, D); in train mode it returns ``(logits, features)``."""

    def __init__(self, *args, video: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        video = dict(video or {})
        unknown = set(video) - {"parts", "reduction"}
        if unknown:
            raise ReIDBenchError(f"unknown video model option(s) {sorted(unknown)} (allowed: parts, reduction)")
        self.config["video"] = video
        self.relation = SpatialTemporalRelation(self.feat_dim, **video)

    def frame_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C, h, w) backbone feature maps of a (B, T, 3, H, W) or (B, 3, H, W) batch."""
        if x.dim() == 4:
            x = x.unsqueeze(1)
        if x.dim() != 5:
            raise ReIDBenchError(f"a video model takes (B, T, 3, H, W) tracklets, got a tensor of shape {tuple(x.shape)}")
        b, t = x.shape[:2]
        maps = self.backbone.forward_features(self.normalize(x.flatten(0, 1)))
        return maps.view(b, t, *maps.shape[1:])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relation(self.frame_maps(x))


def is_video_model(model: nn.Module) -> bool:
    """Whether ``model`` (possibly behind wrappers with a ``model`` attribute) takes tracklets."""
    while not isinstance(model, VideoReIDModel) and hasattr(model, "model"):
        model = model.model
    return isinstance(model, VideoReIDModel)


def check_model_fits(model: nn.Module, split, model_id: str = "the model") -> None:
    """One-line error when an image model meets a video dataset (a video model takes images
    as one-frame tracklets, so the other way round is allowed)."""
    if split.info.get("kind") == "video" and not is_video_model(model):
        raise ReIDBenchError(
            f"dataset '{split.name}' is video data, but {model_id} is an image model: "
            "give it a video option, e.g. model: {video: {parts: 4}}")
