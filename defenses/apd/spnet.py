"""APD stage 2, SP-Net: the ``apd-split`` model head (MSP splits E(x) into K and NK) and the
pieces of the SSD loss that are not the shared re-ID terms (the package docstring says which
parts are the paper's and which ours)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from reidbench.errors import ReIDBenchError
from reidbench.models.reid_model import ReIDModel
from reidbench.registry import MODEL_HEADS

MSP_MAPS = ("element", "spatial")


# --- stage 2: SP-Net -------------------------------------------------------------------------
class MultiScalePerception(nn.Module):
    """MSP: the mean of three sigmoid attention maps from dilated convolutions (package docstring)."""

    def __init__(self, channels: int, maps: str = "element"):
        super().__init__()
        out = channels if maps == "element" else 1
        self.dc1 = nn.Conv2d(channels, out, 3, padding=2, dilation=2)
        self.dc3 = nn.Conv2d(channels, out, 3, padding=2, dilation=2)
        self.dc2 = nn.Conv2d(out, out, 2, padding=1, dilation=2)
        self.dc4 = nn.Conv2d(out, out, 2, padding=1, dilation=2)

    def maps(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        msp1 = torch.sigmoid(self.dc1(fmap))
        msp3 = torch.sigmoid(self.dc3(fmap))
        msp2 = torch.sigmoid(self.dc2(msp3) + self.dc4(msp1))
        return msp1, msp2, msp3

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return sum(self.maps(fmap)) / 3


@MODEL_HEADS.register("apd-split")
class SemanticPurificationModel(ReIDModel):
    """SP-Net: a ReIDModel whose early feature map E(x) is split by MSP into the identity part
    K and the rest NK = E − K; its embedding (branch 1) is computed from K alone."""

    options = ("split_stage", "msp_maps")

    def __init__(self, *args, split_stage: int = 0, msp_maps: str = "element", **kwargs):
        super().__init__(*args, **kwargs)
        from timm.models.efficientnet import EfficientNet
        from timm.models.resnet import ResNet

        if not isinstance(self.backbone, (ResNet, EfficientNet)):
            raise ReIDBenchError(f"model head 'apd-split' splits a timm ResNet or EfficientNet-family network "
                                 f"(MobileNetV2) after its stem or a stage; backbone '{self.config['backbone']}' is neither")
        if split_stage not in (0, 1, 2, 3):
            raise ReIDBenchError(f"model head 'apd-split': split_stage must be 0 (the stem) or 1-3, got {split_stage!r}")
        if msp_maps not in MSP_MAPS:
            raise ReIDBenchError(f"model head 'apd-split': msp_maps must be one of {MSP_MAPS}, got {msp_maps!r}")
        self.config.update(head="apd-split", split_stage=int(split_stage), msp_maps=msp_maps)
        # Names, not a new container: the backbone's weights keep their keys.
        if isinstance(self.backbone, ResNet):
            stages = ["layer1", "layer2", "layer3", "layer4"]
            self._front = ["conv1", "bn1", "act1", "maxpool"] + stages[:split_stage]
            self._rest = stages[split_stage:]
        else:
            # [ours] An EfficientNet-family trunk has no stem stage in feature_info: index i ends
            # at the block group that feature names (MobileNetV2: 0 blocks.0, 1 blocks.1, 2 blocks.2,
            # 3 blocks.4), so the split follows that group; the 1x1 head conv stays in the rest.
            last = int(self.backbone.feature_info[split_stage]["module"].split(".")[1])
            blocks = [f"blocks.{i}" for i in range(len(self.backbone.blocks))]
            self._front = ["conv_stem", "bn1"] + blocks[:last + 1]
            self._rest = blocks[last + 1:] + ["conv_head", "bn2"]
        # timm's feature_info: index 0 is the stem (its max-pool keeps the channels), i stage i.
        self.msp = MultiScalePerception(int(self.backbone.feature_info[split_stage]["num_chs"]), msp_maps)

    def embedding_map(self, x: torch.Tensor) -> torch.Tensor:
        """E(x): the map the split acts on, for images in [0, 1]."""
        x = self.normalize(x)
        for name in self._front:
            x = self.backbone.get_submodule(name)(x)
        return x

    def split(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, NK): identity-relevant part and the rest; they sum to ``fmap``."""
        identity = self.msp(fmap) * fmap
        return identity, fmap - identity

    def branch_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """The shared rest of the network on a part: its pooled pre-neck feature."""
        for name in self._rest:
            fmap = self.backbone.get_submodule(name)(fmap)
        return self.backbone.forward_head(fmap) if self.pool is None else self.pool(fmap).flatten(1)

    def branch(self, fmap: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(logits or None, pre-neck feature) of a part, through the shared neck and classifier."""
        feats = self.branch_features(fmap)
        logits = self.classifier(self.bottleneck(feats)) if self.classifier is not None else None
        return logits, feats

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch_features(self.split(self.embedding_map(x))[0])


# --- stage 2: the SSD losses -----------------------------------------------------------------
def shuffle_partners(pids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B,) for each sample the index of a batch sample of another identity, drawn uniformly."""
    pids = pids.cpu()
    other = (pids.view(-1, 1) != pids.view(1, -1)).float()
    if not other.sum(1).all():
        raise ReIDBenchError("defense 'apd': a training batch needs at least two identities to shuffle NK across them")
    return torch.multinomial(other, 1, generator=generator).view(-1)


def reversed_triplet(feats: torch.Tensor, pids: torch.Tensor,
                     negatives: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softplus(d(a, n) − d(a, p)) and the negative of each anchor: p its closest positive (not
    itself), n its farthest negative, or ``negatives[i]`` when given. Anchors without a
    positive are left out of the mean."""
    dist = torch.cdist(feats, feats)
    same = pids.view(-1, 1) == pids.view(1, -1)
    itself = torch.eye(len(pids), dtype=torch.bool, device=feats.device)
    closest_positive = dist.masked_fill(~same | itself, float("inf")).amin(1)
    if negatives is None:
        negatives = dist.masked_fill(same, float("-inf")).argmax(1)
    negatives = negatives.to(feats.device)
    to_negative = dist.gather(1, negatives.view(-1, 1)).view(-1)
    valid = torch.isfinite(closest_positive) & (pids[negatives] != pids)
    if not valid.any():
        return feats.sum() * 0.0, negatives
    return F.softplus(to_negative[valid] - closest_positive[valid]).mean(), negatives


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module):
    """Batch norms normalise with batch statistics but leave their running ones as they are."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
