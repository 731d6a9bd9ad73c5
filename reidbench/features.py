"""Embedding extraction: the one place where images become the features that are compared.

The protocol compares L2-normalised embeddings with the Euclidean distance; attacks use
:func:`embed` so that what they optimise is exactly what evaluation measures.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .data.split import ReIDSubset
from .progress import progress_bar


def embed(model: torch.nn.Module, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(B, D) embeddings of images in [0, 1]; differentiable w.r.t. ``images``."""
    feats = model(images)
    if isinstance(feats, (tuple, list)):
        feats = feats[0]
    return F.normalize(feats.float(), dim=1) if normalize else feats.float()


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    subset: ReIDSubset,
    size: Optional[tuple[int, int]] = None,
    batch_size: int = 256,
    normalize: bool = True,
    description: str = "features",
    progress: bool = True,
) -> torch.Tensor:
    """Embeddings of every image of ``subset`` (on the CPU), in eval mode."""
    model.eval()
    device = model_device(model)
    out = []
    with progress_bar(enabled=progress and len(subset) > batch_size) as bar:
        task = bar.add_task(description, total=len(subset))
        for start in range(0, len(subset), batch_size):
            index = torch.arange(start, min(start + batch_size, len(subset)))
            images = subset.load(index, size).to(device)
            out.append(embed(model, images, normalize).cpu())
            bar.update(task, advance=len(index))
    return torch.cat(out) if out else torch.zeros(0, 0)
