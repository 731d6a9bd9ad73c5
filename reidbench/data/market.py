"""Real image ReID datasets stored in the Market-1501 folder convention, and MSMT17.

* Market-1501 (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015):
  ``bounding_box_train`` / ``query`` / ``bounding_box_test`` folders of ``PPPP_cCsS_FFFFFF_BB.jpg``
  files, where ``PPPP`` is the person id (``-1`` junk, ``0`` distractor) and ``C`` the camera.
* DukeMTMC-reID uses the same layout with names like ``0005_c2_f0046985.jpg``.
* CUHK03-NP, the new protocol of Zhong et al., "Re-ranking Person Re-identification with
  k-reciprocal Encoding", CVPR 2017: ``cuhk03-np/{detected,labeled}`` in the same layout.
* MSMT17 (Wei et al., "Person Transfer GAN to Bridge Domain Gap for Person
  Re-Identification", CVPR 2018): image folders plus ``list_{train,val,query,gallery}.txt``.
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
from .split import ReIDSplit, ReIDSubset, read_image, resize_uint8

__all__ = [
    "parse_market_name",
    "load_market_folder",
    "load_msmt17_list",
    "build_market1501",
    "build_dukemtmcreid",
    "build_cuhk03_np",
    "build_msmt17",
    "build_market1501_trainsplit",
    "materialize_split",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MARKET_PARTS = ("bounding_box_train", "query", "bounding_box_test")
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")

# The commonly used ReID input size; the datasets whose crops vary in size are resized to it
# when materialized unless the caller asks for another size.
DEFAULT_VARIABLE_SIZE = (256, 128)


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


def _image_files(folder: Path) -> list[str]:
    # Names starting with '.' are skipped: archives made on macOS carry '._0002_c1...jpg'
    # resource-fork files that are neither images nor mistakes of the user.
    with os.scandir(folder) as entries:
        names = [
            e.name
            for e in entries
            if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()
        ]
    return sorted(names)


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
    names = _image_files(folder)
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


# --------------------------------------------------------------------------- finding folders


def _find_dataset(
    dataset: str, names: Sequence[str], root: Optional[Path], required: Sequence[str], under_root: Sequence[str] = ()
) -> Path:
    """The first candidate folder holding every entry of ``required``.

    With ``root`` given, ``root`` itself and ``root/<name>`` are tried (so it may point at the
    dataset folder or at the folder that holds it), then ``root/<under_root>``; otherwise
    ``data_roots()/<name>``.
    """
    from . import data_roots  # looked up at call time so $REIDBENCH_DATA changes are seen

    if root is not None:
        root = Path(root).expanduser()
        candidates = [root] + [root / n for n in (*names, *under_root)]
    else:
        candidates = [base / n for base in data_roots() for n in names]
    for candidate in candidates:
        if all((candidate / r).exists() for r in required):
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    # A folder holding part of the layout is most likely the dataset, unpacked incompletely:
    # say what it lacks, which the list of places looked at does not.
    partial = [c for c in candidates if c.is_dir() and any((c / r).exists() for r in required)]
    if partial:
        missing = [r for r in required if not (partial[0] / r).exists()]
        where = f"{partial[0]} is incomplete, it lacks {', '.join(missing)}"
    else:
        where = f"among {looked}"
    raise ReIDBenchError(
        f"{dataset} not found: no folder with {', '.join(required)}; {where} (pass root=... or set REIDBENCH_DATA)"
    )


def _parse_size(image_size, default: tuple[int, int]) -> tuple[int, int]:
    if image_size is None:
        return default
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ReIDBenchError(f"image_size must be (height, width), got {image_size!r}") from None
    if h < 1 or w < 1:
        raise ReIDBenchError(f"image_size must be positive, got {image_size!r}")
    return h, w


def _native_size(path: str) -> tuple[int, int]:
    """(H, W) from the file header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ReIDBenchError(f"cannot read image '{path}': {exc.__class__.__name__}: {exc}") from None


# --------------------------------------------------------------------------- materializing


def _decode_into(paths: Sequence[str], size: tuple[int, int], description: str) -> torch.Tensor:
    # The project's rich bar: on stderr, so stdout stays clean for results, and silent under
    # REIDBENCH_QUIET=1 (tests, CI).
    from ..progress import progress_bar

    out = torch.empty((len(paths), 3, *size), dtype=torch.uint8)
    # Sequential on purpose: these crops are so small that a thread pool measured slower (GIL
    # contention), and read_image's error already names the corrupt file.
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(paths))
        for i, path in enumerate(paths):
            image = read_image(path)
            out[i] = image if tuple(image.shape[-2:]) == size else resize_uint8(image.unsqueeze(0), size)[0]
            if i % 64 == 63 or i == len(paths) - 1:
                bar.update(task, completed=i + 1)
    return out


def _cache_file(dataset: str, split_hash: str, size: tuple[int, int]) -> Path:
    from . import cache_dir

    return cache_dir() / "decoded" / f"{dataset}-{split_hash}-{size[0]}x{size[1]}.pt"


def _load_cache(path: Path, split: ReIDSplit, size: tuple[int, int]) -> Optional[dict]:
    from ..cache import load_verified

    def load(path: Path) -> dict:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("split_hash") != split.split_hash or not all(
            isinstance(blob.get(part), torch.Tensor)
            and blob[part].dtype == torch.uint8
            and tuple(blob[part].shape) == (len(getattr(split, part)), 3, *size)
            for part in ("train", "query", "gallery")
        ):
            raise ValueError("it does not match the split")
        return blob

    return load_verified(path, load, "decoded dataset")


def _save_cache(path: Path, blob: dict) -> None:
    from ..cache import save_torch

    # A read-only or full cache disk should cost speed on the next run, not this run.
    save_torch(blob, path, best_effort=True)


def materialize_split(split: ReIDSplit, dataset: str, size: tuple[int, int]) -> ReIDSplit:
    """Decode a path-based split into memory at ``size`` (H, W), through a disk cache.

    The cache file is ``cache_dir()/decoded/<dataset>-<split_hash>-<H>x<W>.pt``; the split keeps
    the hash of the path-based split, since it names which files went where.
    """
    parts = ("train", "query", "gallery")
    cache = _cache_file(dataset, split.split_hash, size)
    blob = _load_cache(cache, split, size)
    if blob is None:
        paths = [p for part in parts for p in getattr(split, part).paths]
        decoded = _decode_into(paths, size, f"Decoding {dataset} ({len(paths)} images)")
        blob, start = {"split_hash": split.split_hash, "size": list(size)}, 0
        for part in parts:
            n = len(getattr(split, part))
            # Views of one block: torch.save stores the shared storage once and load restores the views.
            blob[part] = decoded[start : start + n]
            start += n
        _save_cache(cache, blob)
    subsets = {
        part: ReIDSubset(
            getattr(split, part).pids,
            getattr(split, part).camids,
            images=blob[part],
            modality=getattr(split, part).modality,
            tracklet=getattr(split, part).tracklet,
        )
        for part in parts
    }
    info = dict(split.info, materialized=True, cache_file=str(cache))
    return ReIDSplit(split.name, image_size=size, split_hash=split.split_hash, info=info, **subsets)


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
    size = _parse_size(image_size, default_size)
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
    base = _find_dataset("market1501", ("Market-1501-v15.09.15", "market1501"), root, MARKET_PARTS)
    return _market_style_split("market1501", base, image_size, (128, 64), materialize)


@DATASETS.register("dukemtmcreid")
def build_dukemtmcreid(root=None, image_size=None, materialize: bool = False, **_) -> ReIDSplit:
    """DukeMTMC-reID in the Market-1501 layout (702 train ids, 8 cameras). Crop sizes vary, so
    ``image_size`` defaults to 256x128."""
    base = _find_dataset("dukemtmcreid", ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid"), root, MARKET_PARTS)
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
    base = _find_dataset(f"cuhk03-np ({variant})", names, root, MARKET_PARTS, under_root=(variant,))
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


# --------------------------------------------------------------------------- MSMT17

MSMT17_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
_MSMT17_DIRS = {"train": ("train", "mask_train_v2"), "test": ("test", "mask_test_v2")}


def _msmt17_camera(name: str) -> Optional[int]:
    # 0000_000_01_0303morning_0015_0.jpg: id, running number, camera (1-based), date+time, frame, box
    fields = Path(name).name.split("_")
    if len(fields) < 3 or not fields[2].isdigit() or int(fields[2]) < 1:
        return None
    return int(fields[2]) - 1


def load_msmt17_list(list_file: str | os.PathLike, image_dir: str | os.PathLike) -> tuple[list[str], list[int], list[int]]:
    """``(paths, pids, camids)`` from an MSMT17 list file of ``relative/path.jpg label`` lines.

    The label is the person id; the camera is the third ``_`` field of the file name (1-based
    in the file, 0-based here), as in the MSMT17 release (Wei et al., CVPR 2018).
    """
    list_file, image_dir = Path(list_file), Path(image_dir)
    if not list_file.is_file():
        raise ReIDBenchError(f"MSMT17 list file not found: {list_file}")
    paths: list[str] = []
    pids: list[int] = []
    camids: list[int] = []
    with open(list_file, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise ReIDBenchError(
                    f"{list_file}:{lineno}: expected 'relative/path.jpg label', got {line.strip()[:80]!r}"
                )
            camid = _msmt17_camera(fields[0])
            if camid is None:
                raise ReIDBenchError(
                    f"{list_file}:{lineno}: cannot read the camera from {fields[0]!r} "
                    f"(expected names like 0000_000_01_0303morning_0015_0.jpg)"
                )
            paths.append(str(image_dir / fields[0]))
            pids.append(int(fields[1]))
            camids.append(camid)
    if not paths:
        raise ReIDBenchError(f"MSMT17 list file {list_file} lists no images")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ReIDBenchError(
            f"{len(missing)} images listed in {list_file} are missing under {image_dir}, e.g. {missing[0]}"
        )
    return paths, pids, camids


@DATASETS.register("msmt17")
def build_msmt17(root=None, image_size=None, materialize: bool = False, **_) -> ReIDSplit:
    """MSMT17 (Wei et al., CVPR 2018), V1 or V2 (faces blurred) release: 1,041 train ids, 3,060
    test ids, 15 cameras. Train is ``list_train.txt`` + ``list_val.txt``, i.e. the full official
    training set of 32,621 images. Query and gallery ids are numbered from 0 in the release, so
    they overlap numerically (not in fact) with the train ids. ``image_size`` defaults to 256x128.
    """
    names = ("MSMT17_V1", "MSMT17_V2", "msmt17", "msmt17/MSMT17_V1", "msmt17/MSMT17_V2")
    base = _find_dataset("msmt17", names, root, MSMT17_LISTS)
    dirs = {}
    for kind, options in _MSMT17_DIRS.items():
        found = [base / o for o in options if (base / o).is_dir()]
        if not found:
            raise ReIDBenchError(f"no {' or '.join(o + '/' for o in options)} image folder in {base}")
        dirs[kind] = found[0]

    def subset(*lists: tuple[str, str]) -> ReIDSubset:
        paths, pids, camids = [], [], []
        for list_name, kind in lists:
            p, i, c = load_msmt17_list(base / list_name, dirs[kind])
            paths += p
            pids += i
            camids += c
        return ReIDSubset(pids=pids, camids=camids, paths=paths)

    train = subset(("list_train.txt", "train"), ("list_val.txt", "train"))
    query = subset(("list_query.txt", "test"))
    gallery = subset(("list_gallery.txt", "test"))
    size = _parse_size(image_size, DEFAULT_VARIABLE_SIZE)
    split = ReIDSplit("msmt17", train, query, gallery, image_size=size)
    split.info = {
        "root": str(base),
        "version": "V2" if dirs["train"].name.endswith("v2") else "V1",
        "num_train_images": len(train),
        "num_train_ids": train.num_ids,
        "num_query": len(query),
        "num_gallery": len(gallery),
        "num_test_ids": query.num_ids,
    }
    return materialize_split(split, "msmt17", size) if materialize else split


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
    base = _find_dataset("market1501-trainsplit", ("market1501-trainsplit",), root, ("bounding_box_train",))
    folder = base / "bounding_box_train"
    full = load_market_folder(folder)
    pids, camids = full.pids.numpy(), full.camids.numpy()
    train_idx, query_idx, gallery_idx = _trainsplit_indices(pids, camids, int(num_train_ids), int(seed))

    def part(idx: np.ndarray) -> ReIDSubset:
        return ReIDSubset(pids=pids[idx], camids=camids[idx], paths=[full.paths[i] for i in idx])

    train, query, gallery = part(train_idx), part(query_idx), part(gallery_idx)
    size = _parse_size(image_size, _native_size(full.paths[0]))
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
