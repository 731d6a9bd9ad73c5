"""Reading a real dataset from disk, whatever its layout: finding its folder, listing its image
files, its image size, and decoding a path-based split into memory through a disk cache. The
dataset families (:mod:`.market`, :mod:`.msmt17`, :mod:`.crossmodal`) build their splits on these.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..cache import cache_dir
from ..errors import ReIDBenchError
from .split import ReIDSplit, ReIDSubset, read_image, resize_uint8

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def data_roots() -> list[Path]:
    """Folders searched for real datasets, in order: $REIDBENCH_DATA, ./data, ../shared/data."""
    roots = []
    if os.environ.get("REIDBENCH_DATA"):
        roots.append(Path(os.environ["REIDBENCH_DATA"]).expanduser())
    roots += [Path.cwd() / "data", Path.cwd().parent / "shared" / "data"]
    return roots


# The commonly used ReID input size; the datasets whose crops vary in size are resized to it
# when materialized unless the caller asks for another size.
DEFAULT_VARIABLE_SIZE = (256, 128)


def image_files(folder: Path) -> list[str]:
    # Names starting with '.' are skipped: archives made on macOS carry '._0002_c1...jpg'
    # resource-fork files that are neither images nor mistakes of the user.
    with os.scandir(folder) as entries:
        names = [
            e.name
            for e in entries
            if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()
        ]
    return sorted(names)


# --------------------------------------------------------------------------- finding folders


def find_dataset(
    dataset: str, names: Sequence[str], root: Optional[Path], required: Sequence[str], under_root: Sequence[str] = ()
) -> Path:
    """The first candidate folder holding every entry of ``required``.

    With ``root`` given, ``root`` itself and ``root/<name>`` are tried (so it may point at the
    dataset folder or at the folder that holds it), then ``root/<under_root>``; otherwise
    ``data_roots()/<name>``.
    """
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


def parse_size(image_size, default: tuple[int, int]) -> tuple[int, int]:
    if image_size is None:
        return default
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ReIDBenchError(f"image_size must be (height, width), got {image_size!r}") from None
    if h < 1 or w < 1:
        raise ReIDBenchError(f"image_size must be positive, got {image_size!r}")
    return h, w


def native_size(path: str) -> tuple[int, int]:
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
