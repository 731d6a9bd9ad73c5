"""ReID models: a timm backbone + pooling + BNNeck, with input normalization inside."""

from .reid_model import IMAGENET_MEAN, IMAGENET_STD, ReIDModel, build_model

__all__ = ["ReIDModel", "build_model", "IMAGENET_MEAN", "IMAGENET_STD"]
