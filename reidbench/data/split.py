"""The data contract: a ReID split is three subsets (train, query, gallery) of images
with person ids and camera ids.

Images are stored as uint8 (N, 3, H, W) tensors -- either held in memory (synthetic data,
small real sets after decoding) or decoded from files on demand -- and handed to models as
float tensors in [0, 1] at the size the model asks for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ReIDBenchError


def read_image(path: str | Path) -> torch.Tensor:
    """Decode one image file to a uint8 (3, H, W) RGB tensor; a corrupt file is a user error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ReIDBenchError(f"cannot read image '{path}': {exc.__class__.__name__}: {exc}") from None


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of a uint8 (N, 3, H, W) batch; a no-op at the same size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class ReIDSubset:
    """One of train / query / gallery.

    Exactly one of ``images`` (uint8 (N, 3, H, W), in memory) or ``paths`` (decoded on
    demand) is set. ``modality`` and ``tracklet`` are optional per-image labels for
    cross-modality and video data.
    """

    pids: torch.Tensor
    camids: torch.Tensor
    images: Optional[torch.Tensor] = None
    paths: Optional[Sequence[str]] = None
    modality: Optional[torch.Tensor] = None
    tracklet: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.pids = torch.as_tensor(self.pids, dtype=torch.long)
        self.camids = torch.as_tensor(self.camids, dtype=torch.long)
        if (self.images is None) == (self.paths is None):
            raise ValueError("a ReIDSubset holds either images or paths")
        n = len(self.pids)
        if len(self.camids) != n or len(self) != n:
            raise ValueError("pids, camids and images must have the same length")

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    @property
    def num_ids(self) -> int:
        return int(torch.unique(self.pids).numel())

    def load_uint8(self, index: Optional[torch.Tensor] = None, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) images for ``index`` (all when None), resized to ``size``."""
        if index is None:
            index = torch.arange(len(self))
        index = torch.as_tensor(index, dtype=torch.long)
        if self.images is not None:
            batch = self.images[index]
            return resize_uint8(batch, size) if size else batch
        decoded = [read_image(self.paths[int(i)]) for i in index]
        target = size or tuple(decoded[0].shape[-2:])
        return torch.cat([resize_uint8(img.unsqueeze(0), target) for img in decoded])

    def load(self, index: Optional[torch.Tensor] = None, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Float images in [0, 1], (B, 3, H, W)."""
        return self.load_uint8(index, size).float().div_(255.0)

    def select(self, index: Sequence[int]) -> "ReIDSubset":
        """The images at ``index``, in that order."""
        index = torch.as_tensor(index, dtype=torch.long)

        def pick(labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if labels is None else labels[index]

        return ReIDSubset(self.pids[index], self.camids[index],
                          images=pick(self.images), paths=None if self.paths is None else [self.paths[int(i)] for i in index],
                          modality=pick(self.modality), tracklet=pick(self.tracklet))

    def materialize(self, size: Optional[tuple[int, int]] = None) -> "ReIDSubset":
        """Decode every file once into memory (at ``size``); in-memory subsets are returned resized."""
        images = self.load_uint8(None, size) if len(self) else torch.zeros(0, 3, *(size or (1, 1)), dtype=torch.uint8)
        return ReIDSubset(self.pids, self.camids, images=images, modality=self.modality, tracklet=self.tracklet)


@dataclass
class ReIDSplit:
    """A dataset ready for the benchmark: disjoint train and test identities, test split into
    query and gallery. ``split_hash`` fingerprints which images went where; every result
    records it so numbers from different splits are never compared."""

    name: str
    train: ReIDSubset
    query: ReIDSubset
    gallery: ReIDSubset
    image_size: tuple[int, int]
    split_hash: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.split_hash:
            self.split_hash = fingerprint(self)

    @property
    def num_train_ids(self) -> int:
        return self.train.num_ids


def fingerprint(split: ReIDSplit) -> str:
    """sha256 over the ids and cameras of every subset (and file names where known)."""
    h = hashlib.sha256()
    for part in (split.train, split.query, split.gallery):
        h.update(part.pids.numpy().tobytes())
        h.update(part.camids.numpy().tobytes())
        if part.paths is not None:
            h.update("\n".join(Path(p).name for p in part.paths).encode())
        h.update(b"|")
    return h.hexdigest()[:16]
