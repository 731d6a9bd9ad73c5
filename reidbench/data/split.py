"""The data contract: a ReID split is three subsets (train, query, gallery) of images
with person ids and camera ids.

Images are stored as uint8 (N, 3, H, W) tensors -- either held in memory (synthetic data,
small real sets after decoding) or decoded from files on demand -- and handed to models as
float tensors in [0, 1] at the size the model asks for.

Video and cross-modality data use the same contract:

* a sample may carry a **modality** label, 0 visible, 1 infrared (:data:`MODALITIES`);
  infrared frames are stored like any image, the single intensity channel replicated to 3;
* a **video** subset (:class:`TrackletSubset`) is a subset whose samples are tracklets: it
  has one pid / camid / modality per tracklet and its ``load`` returns (B, T, 3, H, W). T is
  fixed per subset by :func:`frame_positions`: T frames evenly spread over the tracklet (the
  centre of each of T equal chunks), so a longer tracklet is subsampled and a shorter one
  repeats frames in order. The rule is deterministic, so evaluation, attacks and training
  all see the same frames of a tracklet (training does not re-draw frames per epoch).
* a **cross-modality** split queries one modality against the other; builders return it
  infrared-to-visible and :func:`cross_modality_direction` turns it around.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ReIDBenchError, unknown_name

#: modality labels: ``modality == 0`` visible (colour), ``1`` infrared
MODALITIES = ("visible", "infrared")
VISIBLE, INFRARED = 0, 1
#: query modality -> gallery modality, as the cross-modality protocols name it
DIRECTIONS = ("infrared-to-visible", "visible-to-infrared")


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
        for name in ("modality", "tracklet"):
            labels = getattr(self, name)
            if labels is not None:
                setattr(self, name, torch.as_tensor(labels, dtype=torch.long))
                if len(getattr(self, name)) != n:
                    raise ValueError(f"{name} labels must have one entry per image")

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    @property
    def num_ids(self) -> int:
        return int(torch.unique(self.pids).numel())

    @property
    def stored_size(self) -> Optional[tuple[int, int]]:
        """(H, W) of the images held in memory; None when they are decoded from files."""
        return tuple(self.images.shape[-2:]) if self.images is not None else None

    def load_uint8(self, index: Optional[torch.Tensor] = None, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) images for ``index`` (all when None), resized to ``size``."""
        if index is None:
            index = torch.arange(len(self))
        index = torch.as_tensor(index, dtype=torch.long)
        if self.images is not None:
            batch = self.images[index.to(self.images.device)]  # training may hold the images on a GPU
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


def concat_subsets(parts: Sequence[ReIDSubset], size: tuple[int, int]) -> ReIDSubset:
    """One in-memory subset holding ``parts`` in order, every image at ``size``: e.g. a training
    set extended with generated images. Modality and tracklet labels are kept only when every
    part has them."""
    def joined(name):
        values = [getattr(p, name) for p in parts]
        return torch.cat(values) if all(v is not None for v in values) else None

    images = torch.cat([p.materialize(size).images for p in parts])
    return ReIDSubset(joined("pids"), joined("camids"), images=images, modality=joined("modality"),
                      tracklet=joined("tracklet"))


def frame_positions(length: int, seq_len: int) -> list[int]:
    """The fixed-length rule of video subsets: ``seq_len`` positions in a tracklet of
    ``length`` frames, the centre frame of each of ``seq_len`` equal chunks.

    ``frame_positions(24, 6) == [2, 6, 10, 14, 18, 22]``; ``frame_positions(3, 6) ==
    [0, 0, 1, 1, 2, 2]`` (a short tracklet repeats its frames in order)."""
    if length < 1 or seq_len < 1:
        raise ValueError(f"a tracklet needs at least one frame and seq_len >= 1, got {length}, {seq_len}")
    return [int((i + 0.5) * length / seq_len) for i in range(seq_len)]


@dataclass
class TrackletSubset:
    """A video subset: N tracklets of ``seq_len`` frames.

    ``frames`` holds every stored frame (in memory or as paths) with its ``tracklet`` label;
    ``index`` (N, T) names the frames of each tracklet after :func:`frame_positions`.
    ``pids``, ``camids`` and ``modality`` are per tracklet, so the evaluator, the attacks and
    the P x K sampler treat a tracklet as they treat an image.
    """

    frames: ReIDSubset
    index: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    modality: Optional[torch.Tensor] = None

    @classmethod
    def from_frames(cls, frames: ReIDSubset, seq_len: int) -> "TrackletSubset":
        """Group ``frames`` by their ``tracklet`` label (tracklets in order of first appearance,
        frames in stored order) and fix each tracklet to ``seq_len`` frames."""
        if frames.tracklet is None:
            raise ValueError("frames need tracklet labels to form a video subset")
        ids, first = [], {}
        for row, tid in enumerate(frames.tracklet.tolist()):
            if tid not in first:
                first[tid] = []
                ids.append(tid)
            first[tid].append(row)
        rows = [first[tid] for tid in ids]
        index = torch.tensor([[r[p] for p in frame_positions(len(r), seq_len)] for r in rows], dtype=torch.long)
        head = torch.tensor([r[0] for r in rows], dtype=torch.long)
        for name in ("pids", "camids") + (("modality",) if frames.modality is not None else ()):
            labels = getattr(frames, name)
            if not bool((labels[index] == labels[head].view(-1, 1)).all()):
                raise ValueError(f"every frame of a tracklet must have the same {name}")
        modality = frames.modality[head] if frames.modality is not None else None
        return cls(frames, index.view(-1, seq_len), frames.pids[head], frames.camids[head], modality)

    def __post_init__(self) -> None:
        self.index = torch.as_tensor(self.index, dtype=torch.long)
        self.pids = torch.as_tensor(self.pids, dtype=torch.long)
        self.camids = torch.as_tensor(self.camids, dtype=torch.long)
        if self.modality is not None:
            self.modality = torch.as_tensor(self.modality, dtype=torch.long)
        n = len(self.pids)
        if self.index.dim() != 2 or len(self.index) != n or len(self.camids) != n or (
                self.modality is not None and len(self.modality) != n):
            raise ValueError("index (N, T), pids, camids and modality must describe the same N tracklets")

    def __len__(self) -> int:
        return len(self.pids)

    @property
    def seq_len(self) -> int:
        return int(self.index.shape[1])

    @property
    def num_ids(self) -> int:
        return int(torch.unique(self.pids).numel())

    @property
    def stored_size(self) -> Optional[tuple[int, int]]:
        return self.frames.stored_size

    @property
    def paths(self) -> Optional[list[str]]:
        """Frame files in (tracklet, frame) order, for fingerprints; None for in-memory frames."""
        if self.frames.paths is None:
            return None
        return [self.frames.paths[i] for i in self.index.flatten().tolist()]

    def load_uint8(self, index: Optional[torch.Tensor] = None, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """uint8 (B, T, 3, H, W) tracklets for ``index`` (all when None), resized to ``size``."""
        index = torch.arange(len(self)) if index is None else torch.as_tensor(index, dtype=torch.long)
        rows = self.index[index]
        if rows.numel() == 0:
            h, w = size or self.stored_size or (1, 1)
            return torch.zeros(len(rows), self.seq_len, 3, h, w, dtype=torch.uint8)
        flat = self.frames.load_uint8(rows.flatten(), size)
        return flat.view(len(rows), self.seq_len, *flat.shape[1:])

    def load(self, index: Optional[torch.Tensor] = None, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Float tracklets in [0, 1], (B, T, 3, H, W)."""
        return self.load_uint8(index, size).float().div_(255.0)

    def select(self, index: Sequence[int]) -> "TrackletSubset":
        """The tracklets at ``index``, in that order (sharing the stored frames)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return TrackletSubset(self.frames, self.index[index], self.pids[index], self.camids[index],
                              None if self.modality is None else self.modality[index])

    def materialize(self, size: Optional[tuple[int, int]] = None) -> "TrackletSubset":
        """Decode into memory (at ``size``) only the frames the tracklets use."""
        used, inverse = torch.unique(self.index, return_inverse=True)
        f = self.frames
        images = f.load_uint8(used, size) if len(used) else torch.zeros(0, 3, *(size or (1, 1)), dtype=torch.uint8)
        frames = ReIDSubset(f.pids[used], f.camids[used], images=images,
                            modality=None if f.modality is None else f.modality[used],
                            tracklet=None if f.tracklet is None else f.tracklet[used])
        return TrackletSubset(frames, inverse.view_as(self.index), self.pids, self.camids, self.modality)


@dataclass
class ReIDSplit:
    """A dataset ready for the benchmark: disjoint train and test identities, test split into
    query and gallery. ``split_hash`` fingerprints which images went where; every result
    records it so numbers from different splits are never compared."""

    name: str
    train: ReIDSubset | TrackletSubset
    query: ReIDSubset | TrackletSubset
    gallery: ReIDSubset | TrackletSubset
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
    """sha256 over the ids and cameras of every subset (and file names where known; the
    frames of each tracklet, and modality labels, where the subsets have them)."""
    h = hashlib.sha256()
    for part in (split.train, split.query, split.gallery):
        h.update(part.pids.numpy().tobytes())
        h.update(part.camids.numpy().tobytes())
        if part.paths is not None:
            h.update("\n".join(Path(p).name for p in part.paths).encode())
        if part.modality is not None:
            # Image splits without modality keep the hash they always had.
            h.update(b"modality" + part.modality.numpy().tobytes())
        if isinstance(part, TrackletSubset):
            h.update(b"tracklets" + part.index.numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def query_subset(split: ReIDSplit, n: int, seed: int) -> ReIDSplit:
    """``split`` with ``n`` of its queries: the first ``n`` of a permutation seeded by ``seed``,
    in their stored order (so a smaller subset is part of a larger one), against the whole
    gallery. ``info["query_subset"]`` says which; the split hash stays the full split's."""
    total = len(split.query)
    if not 1 <= n <= total:
        raise ReIDBenchError(f"--queries {n}: dataset '{split.name}' has {total} queries; ask for 1 to {total}")
    index = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    info = dict(split.info, query_subset={"queries": n, "of": total, "seed": seed})
    return ReIDSplit(split.name, split.train, split.query.select(index), split.gallery, split.image_size,
                     split.split_hash, info)


def cross_modality_direction(split: ReIDSplit, direction: str) -> ReIDSplit:
    """``split`` queried in ``direction`` (one of :data:`DIRECTIONS`).

    Cross-modality builders return infrared queries against a visible gallery (HITSZ-VCM's
    ``query_IDX`` tracklets, SYSU-MM01's infrared probes, RegDB's thermal images);
    ``visible-to-infrared`` swaps query and gallery, as the HITSZ-VCM reference code does
    for its second direction. Camera ids are passed to the evaluator unchanged: its
    same-identity-same-camera rule is each dataset's camera filter (see its builder)."""
    if direction not in DIRECTIONS:
        raise unknown_name("cross-modality direction", direction, DIRECTIONS)
    if split.query.modality is None or split.gallery.modality is None:
        raise ReIDBenchError(
            f"dataset '{split.name}' has no modality labels (visible/infrared), so it has no "
            f"cross-modality direction '{direction}'")
    if not (bool((split.query.modality == INFRARED).all()) and bool((split.gallery.modality == VISIBLE).all())):
        raise ReIDBenchError(f"dataset '{split.name}' does not query infrared against visible samples, "
                             f"so '{direction}' is not defined on it")
    info = dict(split.info, direction=direction)
    if direction == DIRECTIONS[0]:
        return ReIDSplit(split.name, split.train, split.query, split.gallery, split.image_size, split.split_hash, info)
    swapped_hash = hashlib.sha256(f"{direction}:{split.split_hash}".encode()).hexdigest()[:16]
    return ReIDSplit(split.name, split.train, split.gallery, split.query, split.image_size, swapped_hash, info)
