"""The ReID model wrapper every attack and defense sees.

Images enter in [0, 1]; mean/std normalization is the first layer, so attacks measure ε in
pixel units and never touch normalization. The architecture is the "bag of tricks" baseline
(Luo et al., CVPRW 2019): any timm backbone, optional last stride 1, global pooling, and a
BNNeck whose pre-BN feature feeds the triplet loss and whose post-BN feature feeds the
classifier and, at test time, the embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ReIDBenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GeneralizedMeanPooling(nn.Module):
    """GeM pooling (Radenović et al., TPAMI 2019) with a learnable exponent."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p).flatten(1)


def _create_backbone(name: str, pretrained: bool | str | dict, global_pool: str, backbone_args: Optional[dict] = None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        from ..errors import unknown_name

        raise unknown_name("backbone", name, timm.list_models())
    kwargs = dict(num_classes=0, global_pool=global_pool, **(backbone_args or {}))
    if isinstance(pretrained, dict):  # a pinned file: loaded by ReIDModel.load_pretrained when training starts
        pretrained = False
    elif isinstance(pretrained, (str, Path)) and str(pretrained) not in ("True", "False"):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ReIDBenchError(f"pretrained weights file not found: {path}")
        # timm reads a local file through the pretrained config overlay; no network is touched.
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
        pretrained = True
    try:
        return timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    except TypeError as exc:  # a backbone_args key the architecture does not take
        raise ReIDBenchError(f"backbone '{name}' does not accept backbone_args {backbone_args}: {exc}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ReIDBenchError(
            f"cannot load pretrained weights for '{name}' (no network or not in the Hugging Face cache?): "
            f"{first[:200]}; train from scratch with pretrained=false or pass a local weights file"
        ) from None


def _set_last_stride_one(backbone: nn.Module) -> bool:
    """Remove the downsampling of the last stage (Sun et al., PCB, ECCV 2018), doubling the
    final feature map. Returns False when the backbone has no recognisable last stage."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        return False
    last = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
    stage = backbone.get_submodule(last)
    if not any(_downsamples(m) for m in stage.modules()):
        # MobileNet-style stages: the last reported stage keeps its size and the stride-2
        # block sits before it (mobilenetv2_100: blocks.5 downsamples, blocks.6 is reported).
        # Take the top-level block that holds the network's last stride-2 convolution.
        names = [name for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
        if not names:
            return False
        stage = backbone.get_submodule(".".join(names[-1].split(".")[:2]))
    changed = False
    for module in stage.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
            changed = True
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)) and module.stride in (2, (2, 2)):
            # ResNet-D style shortcuts downsample with a pool; make it a no-op in size.
            module.stride, module.kernel_size, module.padding = 1, 1, 0
            changed = True
    return changed


def _downsamples(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.stride == (2, 2)) or (
        isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)) and module.stride in (2, (2, 2)))


class ReIDModel(nn.Module):
    """Backbone + pooling + BNNeck.

    ``forward`` in eval mode returns (B, D) embeddings; in train mode it returns
    ``(logits, global_features)`` (logits only when ``num_classes > 0``; otherwise ``None``).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 0,
        pretrained: bool | str | dict = False,
        last_stride: int = 1,
        pooling: str = "avg",
        neck: str = "bnneck",
        embedding: str = "after_bn",
        input_size: Sequence[int] = (256, 128),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        backbone_args: Optional[dict] = None,
    ):
        super().__init__()
        if pooling not in ("avg", "max", "gem"):
            raise ReIDBenchError(f"unknown pooling '{pooling}' (choose avg, max or gem)")
        if neck not in ("bnneck", "none"):
            raise ReIDBenchError(f"unknown neck '{neck}' (choose bnneck or none)")
        if embedding not in ("after_bn", "before_bn"):
            raise ReIDBenchError(f"unknown embedding '{embedding}' (choose after_bn or before_bn)")
        self.config = dict(
            backbone=backbone, num_classes=num_classes, last_stride=last_stride, pooling=pooling,
            neck=neck, embedding=embedding, input_size=list(input_size), mean=list(mean), std=list(std),
            backbone_args=dict(backbone_args or {}),
        )
        self.input_size = tuple(int(s) for s in input_size)
        #: a pinned ImageNet file ({file, sha256, layout}); see :meth:`load_pretrained`
        self.pretrained_file = pretrained if isinstance(pretrained, dict) else None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # Pooling other than avg needs the spatial map, which timm returns with global_pool="".
        self.backbone = _create_backbone(backbone, pretrained, "avg" if pooling == "avg" else "", backbone_args)
        if last_stride == 1:
            _set_last_stride_one(self.backbone)
        # oneDNN's CPU convolutions (and cuDNN's under AMP) run fastest on NHWC; weights and
        # inputs must share the layout or every call reorders one of them. Only strides
        # change: state dicts are saved contiguous (cache.save_safetensors), so weights files
        # and their hashes are the same either way. benchmarks/bench_cpu_settings.py measures it.
        self.backbone.to(memory_format=torch.channels_last)
        self.pool = {"avg": None, "max": nn.AdaptiveMaxPool2d(1), "gem": GeneralizedMeanPooling()}[pooling]
        self.feat_dim = int(self.backbone.num_features)
        if neck == "bnneck":
            self.bottleneck = nn.BatchNorm1d(self.feat_dim)
            self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift, so the classifier sees a centred space
        else:
            self.bottleneck = nn.Identity()
        self.classifier = nn.Linear(self.feat_dim, num_classes, bias=False) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def load_pretrained(self) -> Optional[Path]:
        """Initialise the backbone from the pinned file the model was built with (training
        from scratch calls this; trained weights make it unnecessary). None without one."""
        if self.pretrained_file is None:
            return None
        from .pretrained import load_pretrained

        return load_pretrained(self.backbone, self.config["backbone"], self.pretrained_file)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to the backbone's mean/std input space."""
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled global feature before the neck, for images in [0, 1]."""
        x = self.normalize(x).contiguous(memory_format=torch.channels_last)
        if self.pool is None:
            return self.backbone(x)
        fmap = self.backbone.forward_features(x)
        return self.pool(fmap).flatten(1)

    def forward(self, x: torch.Tensor):
        global_feat = self.features(x)
        bn_feat = self.bottleneck(global_feat)
        if self.training:
            logits = self.classifier(bn_feat) if self.classifier is not None else None
            return logits, global_feat
        return bn_feat if self.config["embedding"] == "after_bn" else global_feat


class EmbeddingOnly(nn.Module):
    """Wraps a model whose eval forward returns a tuple so that it returns the embedding alone."""

    def __init__(self, model: nn.Module, index: int = 0):
        super().__init__()
        self.model, self.index = model, index
        self.input_size: Optional[tuple] = getattr(model, "input_size", None)

    def forward(self, x):
        out = self.model(x)
        return out[self.index] if isinstance(out, (tuple, list)) else out
