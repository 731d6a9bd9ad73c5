"""ReID models: a timm backbone + pooling + BNNeck, with input normalization inside."""

from .factory import build_model
from .reid_model import IMAGENET_MEAN, IMAGENET_STD, ReIDModel
from .video import VideoReIDModel, check_model_fits, is_video_model

__all__ = ["ReIDModel", "VideoReIDModel", "build_model", "check_model_fits", "is_video_model", "IMAGENET_MEAN",
           "IMAGENET_STD"]
