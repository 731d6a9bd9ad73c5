"""Real image ReID datasets stored in the Market-1501 folder convention, and this project's
re-split of the Market-1501 training folder.

* Market-1501 (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015):
  ``bounding_box_train`` / ``query`` / ``bounding_box_test`` folders of ``PPPP_cCsS_FFFFFF_BB.jpg``
  files, where ``PPPP`` is the person id (``-1`` junk, ``0`` distractor) and ``C`` the camera.
* DukeMTMC-reID uses the same layout with names like ``0005_c2_f0046985.jpg``.
* CUHK03-NP, the new protocol of Zhong et al., "Re-ranking Person Re-identification with
  k-reciprocal Encoding", CVPR 2017: ``cuhk03-np/{detected,labeled}`` in the same layout.
* ``market1501-trainsplit``: this project's own re-split of the Market-1501 training folder,
  for machines that only hold that folder (see :func:`build_market1501_trainsplit`).

Person ids are kept as the dataset defines them (no relabelling), so train and test ids of
the Market-style sets stay numerically disjoint; trainers map train ids to class indices.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ReIDBenchError, unknown_name
from ..registry import DATASETS
from .files import DEFAULT_VARIABLE_SIZE, find_dataset, image_files, materialize_split, native_size, parse_size
from .split import ReIDSplit, ReIDSubset

__all__ = [
    "parse_market_name",
    "load_market_folder",
    "build_market1501",
    "build_dukemtmcreid",
    "build_cuhk03_np",
    "build_market1501_trainsplit",
]

MARKET_PARTS = ("bounding_box_train", "query", "bounding_box_test")
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def parse_market_name(name: str | os.PathLike) -> Optional[tuple[int, int]]:
    """``(pid, camid)`` from a Market-1501 / DukeMTMC-reID / CUHK03-NP file name, camid 0-based.

    ``0002_c1s1_000451_03.jpg`` -> ``(2, 0)``, ``-1_c3s2_...`` -> ``(-1, 2)``,
    ``0005_c2_f0046985.jpg`` -> ``(5, 1)``; a name that does not match gives ``None``.
    """
    match = _MARKET_NAME.match(os.path.basename(os.fspath(name)))
    if match is None:
        return None
    camera = int(match.group(2))
    if camera < 1:  # cameras are numbered from 1; c0 is a malformed name, not a camera
        return None
    return int(match.group(1)), camera - 1


def _relabel(pids: Sequence[int]) -> list[int]:
    mapping = {pid: i for i, pid in enumerate(sorted(set(pids)))}
    return [mapping[p] for p in pids]


def load_market_folder(folder: str | os.PathLike, relabel: bool = False) -> ReIDSubset:
    """A path-based subset from one Market-style folder (``bounding_box_train``, ``query``, ...).

    Files (``.jpg``/``.png``) are taken in name order; junk images (pid ``-1``) are dropped and
    distractors (pid ``0``) kept, as in the Market-1501 protocol. ``relabel`` maps the ids to
    ``0..n-1`` in sorted order.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReIDBenchError(f"dataset folder not found: {folder}")
    names = image_files(folder)
    if not names:
        raise ReIDBenchError(f"{folder} contains no images (.jpg or .png)")
    parsed = [parse_market_name(n) for n in names]
    bad = [n for n, p in zip(names, parsed) if p is None]
    if bad:
        raise ReIDBenchError(
            f"{len(bad)} file names in {folder} do not follow the PPPP_cC... pattern "
            f"(person id, '_c', camera number), e.g. '{bad[0]}'"
        )
    kept = [(n, p) for n, p in zip(names, parsed) if p[0] != -1]
    if not kept:
        raise ReIDBenchError(f"{folder} contains only junk images (person id -1)")
    pids = [p[0] for _, p in kept]
    camids = [p[1] for _, p in kept]
    if relabel:
        pids = _relabel(pids)
    prefix = str(folder)
    return ReIDSubset(pids=pids, camids=camids, paths=[os.path.join(prefix, n) for n, _ in kept])

# --------------------------------------------------------------------------- Market-style sets


def _market_style_split(
    name: str,
    base: Path,
    image_size,
    default_size: tuple[int, int],
    materialize: bool,
    cache_name: Optional[str] = None,
    hash_salt: str = "",
    info: Optional[dict] = None,
) -> ReIDSplit:
    train, query, gallery = (load_market_folder(base / part) for part in MARKET_PARTS)
    size = parse_size(image_size, default_size)
    split = ReIDSplit(name, train, query, gallery, image_size=size)
    if hash_salt:
        # Variants that share file names (CUHK03-NP detected / labeled) must not share a hash.
        split.split_hash = hashlib.sha256(f"{hash_salt}:{split.split_hash}".encode()).hexdigest()[:16]
    split.info = {
        "root": str(base),
        "num_train_images": len(train),
        "num_train_ids": train.num_ids,
        "num_query": len(query),
        "num_gallery": len(gallery),
        "num_test_ids": query.num_ids,
        "num_cameras": int(torch.unique(torch.cat([train.camids, query.camids, gallery.camids])).numel()),
        **(info or {}),
    }
    return materialize_split(split, cache_name or name, size) if materialize else split


@DATASETS.register("market1501")
def build_market1501(root=None, image_size=None, materialize: bool = False, **_) -> ReIDSplit:
    """Market-1501 (Zheng et al., ICCV 2015), official split: 751 train ids / 750 test ids,
    3,368 queries, 6 cameras. Crops are 128x64, the default ``image_size``."""
    base = find_dataset("market1501", ("Market-1501-v15.09.15", "market1501"), root, MARKET_PARTS)
    return _market_style_split("market1501", base, image_size, (128, 64), materialize)


@DATASETS.register("dukemtmcreid")
def build_dukemtmcreid(root=None, image_size=None, materialize: bool = False, **_) -> ReIDSplit:
    """DukeMTMC-reID in the Market-1501 layout (702 train ids, 8 cameras). Crop sizes vary, so
    ``image_size`` defaults to 256x128."""
    base = find_dataset("dukemtmcreid", ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid"), root, MARKET_PARTS)
    return _market_style_split("dukemtmcreid", base, image_size, DEFAULT_VARIABLE_SIZE, materialize)


CUHK03_VARIANTS = ("detected", "labeled")


@DATASETS.register("cuhk03-np")
def build_cuhk03_np(root=None, image_size=None, variant: str = "detected", materialize: bool = False, **_) -> ReIDSplit:
    """CUHK03 under the new protocol of Zhong et al., CVPR 2017 (767 train / 700 test ids,
    2 cameras), from ``cuhk03-np/<variant>``; ``variant`` is ``detected`` (default) or ``labeled``
    boxes. The two variants have the same file names, so the variant is folded into the split
    hash. Crop sizes vary; ``image_size`` defaults to 256x128."""
    if variant not in CUHK03_VARIANTS:
        raise unknown_name("cuhk03-np variant", str(variant), CUHK03_VARIANTS)
    names = (f"cuhk03-np/{variant}", f"CUHK03-NP/{variant}")
    # root may also be the cuhk03-np folder itself, holding detected/ and labeled/
    base = find_dataset(f"cuhk03-np ({variant})", names, root, MARKET_PARTS, under_root=(variant,))
    return _market_style_split(
        "cuhk03-np",
        base,
        image_size,
        DEFAULT_VARIABLE_SIZE,
        materialize,
        cache_name=f"cuhk03-np-{variant}",
        hash_salt=variant,
        info={"variant": variant},
    )

# --------------------------------------------------------------------------- Market-1501 train re-split


def _trainsplit_indices(pids: np.ndarray, camids: np.ndarray, num_train_ids: int, seed: int):
    ids = np.unique(pids)  # sorted
    if not 0 < num_train_ids < len(ids):
        raise ReIDBenchError(
            f"market1501-trainsplit: num_train_ids must be between 1 and {len(ids) - 1} "
            f"(the folder has {len(ids)} identities), got {num_train_ids}"
        )
    train_ids, test_ids = ids[:num_train_ids], ids[num_train_ids:]
    rng = np.random.default_rng(seed)
    is_query = np.zeros(len(pids), dtype=bool)
    for pid in test_ids:
        of_pid = pids == pid
        for cam in np.unique(camids[of_pid]):
            candidates = np.flatnonzero(of_pid & (camids == cam))
            is_query[candidates[rng.integers(len(candidates))]] = True
    is_train = np.isin(pids, train_ids)
    return np.flatnonzero(is_train), np.flatnonzero(is_query), np.flatnonzero(~is_train & ~is_query)


@DATASETS.register("market1501-trainsplit")
def build_market1501_trainsplit(
    root=None,
    image_size=None,
    num_train_ids: int = 500,
    seed: int = 0,
    materialize: bool = True,
    **_,
) -> ReIDSplit:
    """A deterministic re-split of the Market-1501 (Zheng et al., ICCV 2015) **training** folder
    ``<root>/market1501-trainsplit/bounding_box_train`` (12,936 images, 751 ids, 6 cameras, 128x64).

    The split: take the images in file-name order and the sorted identity ids; the first
    ``num_train_ids`` (500) ids are train, the rest (251) test. With
    ``rng = numpy.random.default_rng(seed)``, for each test id in ascending order and each camera
    it appears in (ascending), the query is ``candidates[rng.integers(len(candidates))]`` where
    ``candidates`` are that id's images from that camera in file-name order; every other test
    image is gallery. ``split_hash`` fingerprints the file names of each part.

    Numbers measured on this split are NOT comparable with official Market-1501 tables (other
    identities, fewer of them, one query per camera rather than the official query set).

    Images are materialized at ``image_size`` (default: the native size of the first file,
    128x64 for Market-1501) and cached decoded under ``cache_dir()/decoded``, so a second build
    is fast; ``materialize=False`` keeps the split path-based.
    """
    base = find_dataset("market1501-trainsplit", ("market1501-trainsplit",), root, ("bounding_box_train",))
    folder = base / "bounding_box_train"
    full = load_market_folder(folder)
    pids, camids = full.pids.numpy(), full.camids.numpy()
    train_idx, query_idx, gallery_idx = _trainsplit_indices(pids, camids, int(num_train_ids), int(seed))

    def part(idx: np.ndarray) -> ReIDSubset:
        return ReIDSubset(pids=pids[idx], camids=camids[idx], paths=[full.paths[i] for i in idx])

    train, query, gallery = part(train_idx), part(query_idx), part(gallery_idx)
    size = parse_size(image_size, native_size(full.paths[0]))
    split = ReIDSplit("market1501-trainsplit", train, query, gallery, image_size=size)

    # A query whose id has no gallery image from another camera cannot be matched under the
    # Market-1501 protocol; count them so an evaluation that skips such queries is explained.
    gallery_cams: dict[int, set[int]] = {}
    for pid, cam in zip(gallery.pids.tolist(), gallery.camids.tolist()):
        gallery_cams.setdefault(pid, set()).add(cam)
    unmatched = sum(
        not (gallery_cams.get(pid, set()) - {cam}) for pid, cam in zip(query.pids.tolist(), query.camids.tolist())
    )
    split.info = {
        "root": str(base),
        "source": str(folder),
        "comparable_with_official_market1501": False,
        "num_train_ids_requested": int(num_train_ids),
        "seed": int(seed),
        "num_images": len(full),
        "num_ids": len(np.unique(pids)),
        "num_cameras": len(np.unique(camids)),
        "num_train_images": len(train),
        "num_train_ids": train.num_ids,
        "num_test_ids": query.num_ids,
        "num_query": len(query),
        "num_gallery": len(gallery),
        "num_query_without_cross_camera_match": int(unmatched),
    }
    return materialize_split(split, "market1501-trainsplit", size) if materialize else split
