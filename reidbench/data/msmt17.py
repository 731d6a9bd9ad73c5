"""MSMT17 (Wei et al., "Person Transfer GAN to Bridge Domain Gap for Person Re-Identification",
CVPR 2018): image folders plus ``list_{train,val,query,gallery}.txt``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import ReIDBenchError
from ..registry import DATASETS
from .files import DEFAULT_VARIABLE_SIZE, find_dataset, materialize_split, parse_size
from .split import ReIDSplit, ReIDSubset

__all__ = ["load_msmt17_list", "build_msmt17"]

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
    base = find_dataset("msmt17", names, root, MSMT17_LISTS)
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
    size = parse_size(image_size, DEFAULT_VARIABLE_SIZE)
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
