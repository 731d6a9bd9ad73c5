"""The one training loop every defense reuses."""

from .loop import Recipe, TrainResult, train_model

__all__ = ["Recipe", "TrainResult", "train_model"]
