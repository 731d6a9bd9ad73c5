"""One example query per result cell, for the leaderboard's qualitative figure.

The attack papers show a query with its top-ranked gallery images before and after the
attack, a green border on each image of the query's identity and a red one on the others
(Bai et al. 2019, Fig. 1; Bouniot et al. 2020, Fig. 4). A record keeps what that figure
needs and no more: which query (chosen from the protocol seed, so every cell of a model
shows the same one), its top-10 gallery indices and match flags under the plain distance,
clean and attacked, and 64×32 PNG thumbnails -- the query, its attacked version, and at
most ten gallery images taken in rank order from both rankings -- about 12 × 5 kB of
base64 per record. Positions without a thumbnail keep their index and match flag.

The ranking is the one the metrics score: gallery images of the query's identity *and*
camera, and junk (pid -1), are left out (the Market-1501 protocol, ``metrics/rank.py``),
ties broken by gallery index. When the attack perturbs the gallery, the query is clean and
the thumbnails show clean gallery images; the attacked ranking is the perturbed gallery's.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .data.split import ReIDSplit, resize_uint8

THUMBNAIL_SIZE = (64, 32)
TOP_K = 10
GALLERY_THUMBNAILS = 10


@dataclass
class ExampleCapture:
    """Which query the example shows, and (filled in while attacking) its adversarial image."""

    index: Optional[int]
    image: Optional[torch.Tensor] = None


def example_query_index(split: ReIDSplit, seed: int) -> Optional[int]:
    """A query drawn with ``seed`` among those the metrics score (a same-identity gallery
    image from another camera exists); None when there is none."""
    gallery_pids, gallery_cams = split.gallery.pids.tolist(), split.gallery.camids.tolist()
    per_pid = Counter(p for p in gallery_pids if p != -1)
    per_pid_cam = Counter((p, c) for p, c in zip(gallery_pids, gallery_cams) if p != -1)
    valid = [i for i, (p, c) in enumerate(zip(split.query.pids.tolist(), split.query.camids.tolist()))
             if per_pid[p] - per_pid_cam[(p, c)] > 0]
    if not valid:
        return None
    return valid[int(np.random.default_rng(seed).integers(len(valid)))]


def top_ranking(distances: torch.Tensor, split: ReIDSplit, query_index: int, k: int = TOP_K) -> dict:
    """The first ``k`` scored gallery indices for one query's distance row, with match flags."""
    pid, cam = int(split.query.pids[query_index]), int(split.query.camids[query_index])
    gallery = split.gallery
    left_out = ((gallery.pids == -1) | ((gallery.pids == pid) & (gallery.camids == cam))).numpy()
    row = distances.detach().cpu().double().numpy()
    order = np.argsort(np.where(left_out, np.inf, row), kind="stable")
    order = order[~left_out[order]][:k]
    return {"gallery_index": [int(i) for i in order],
            "match": [bool(gallery.pids[int(i)] == pid) for i in order]}


def png_base64(image: torch.Tensor) -> str:
    """A (3, H, W) image, uint8 or float in [0, 1], as base64 PNG at the thumbnail size. A
    (T, 3, H, W) tracklet shows its first frame: a thumbnail has one slot."""
    from PIL import Image

    if image.dim() == 4:
        image = image[0]
    if image.dtype != torch.uint8:
        image = image.detach().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    small = resize_uint8(image.cpu().unsqueeze(0), THUMBNAIL_SIZE)[0]
    buffer = io.BytesIO()
    Image.fromarray(small.permute(1, 2, 0).numpy()).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def ranking_example(split: ReIDSplit, capture: ExampleCapture, clean_distances: torch.Tensor,
                    attacked_distances: torch.Tensor) -> dict:
    """The record's ``example`` block from the example query's clean and attacked distance rows."""
    index = capture.index
    clean = top_ranking(clean_distances, split, index)
    attacked = top_ranking(attacked_distances, split, index)
    shown: list[int] = []
    for pair in zip(clean["gallery_index"], attacked["gallery_index"]):  # rank by rank, both rankings
        for g in pair:
            if g not in shown and len(shown) < GALLERY_THUMBNAILS:
                shown.append(g)
    thumbnails = {"query": png_base64(split.query.load_uint8(torch.tensor([index]))[0]),
                  "gallery": {str(g): png_base64(split.gallery.load_uint8(torch.tensor([g]))[0]) for g in shown}}
    if capture.image is not None:
        thumbnails["query_attacked"] = png_base64(capture.image)
    return {"query_index": index, "query_pid": int(split.query.pids[index]),
            "query_camid": int(split.query.camids[index]), "clean": clean, "attacked": attacked,
            "thumbnail_size": list(THUMBNAIL_SIZE), "thumbnails": thumbnails}
