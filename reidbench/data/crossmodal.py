"""Visible-infrared ReID datasets in their public release layouts.

Every split here is returned **infrared-to-visible** (infrared queries, visible gallery);
``direction: visible-to-infrared`` (an option of any dataset, applied by
:func:`reidbench.data.build_dataset`) swaps query and gallery. Modality labels are 0 visible,
1 infrared. The evaluator's rule (a gallery sample of the query's identity *and camera* is
removed) is each protocol's camera filter, expressed through the camera ids passed to it:

* **HITSZ-VCM** (Lin et al., "Learning Modal-Invariant and Temporal-Memory for Video-based
  Visible-Infrared Person Re-Identification", CVPR 2022), video. Folder: ``info/`` with
  ``train_name.txt`` / ``test_name.txt`` (one frame name per line, e.g. ``0001M1D1T001F001.jpg``:
  pid ``0001``, modality digit at position 5 (``1`` infrared), camera ``D..`` up to ``T``,
  file ``F`` onwards), ``track_train_info.txt`` / ``track_test_info.txt`` (one tracklet per
  line: ``modality start end pid camid``, 1-based inclusive rows of the name list; modality
  ``1`` infrared, else visible) and ``query_IDX.txt`` (1-based rows of the test tracklets that
  are queries: the infrared ones); frames in ``Train/`` and ``Test/`` as
  ``<pid>/<ir|rgb>/<camera>/<file>``. As the reference code (VCM-project233/MITML): tracklets
  shorter than ``min_seq_len`` = 12 frames are dropped (train and test), test tracklets are
  ``seq_len`` = 6 frames, camera ids are the track file's, passed unchanged (its evaluation
  is the Market-1501 one, so a query's same-camera tracklets of its identity do not count).
  The reference samples training frames at random each epoch; here training, like the test,
  sees the fixed :func:`~reidbench.data.split.frame_positions` frames.
* **SYSU-MM01** (Wu et al., "RGB-Infrared Cross-Modality Person Re-Identification", ICCV
  2017), images. Folder: ``cam1`` .. ``cam6`` of ``<pid:04d>/<image>.jpg``; ``exp/train_id.txt``,
  ``val_id.txt``, ``test_id.txt`` (comma-separated ids). Cameras 3 and 6 are infrared. Train:
  train + val ids (the usual practice since Ye et al.'s AGW; ``train_with_val``). Queries:
  every infrared test image; gallery: ``gallery_shots`` (1: single-shot) images per identity
  and visible camera (cameras 1, 2, 4, 5 in ``mode: all``; 1, 2 in ``mode: indoor``), drawn
  with ``numpy.random.default_rng(trial)`` (the reference draws with Python's ``random``, so
  trial k is another draw than the reference's trial k). Camera filter: the official rule
  drops camera-2 gallery images for camera-3 queries (the same room). With
  ``same_room_filter`` (default) cameras 2 and 3 share one camera id in query and gallery, so
  the evaluator drops a camera-3 query's *same-identity* camera-2 images; unlike the
  reference's ``eval_sysu`` the camera-2 images of other identities stay in the ranking as
  negatives (slightly harder). The reference's CMC (over unique gallery identities) is not
  reproduced: CMC here is the standard one.
* **RegDB** (Nguyen et al., "Person Recognition System Based on a Combination of Body Images
  from Visible Light and Thermal Cameras", Sensors 2017), images. Folder: ``Visible/``,
  ``Thermal/`` and ``idx/{train,test}_{visible,thermal}_<trial>.txt`` (``relative/path label``
  lines; trials 1..10). One visible and one thermal camera: camera id 0 visible, 1 thermal,
  so nothing is filtered (the reference ``eval_regdb`` keeps every gallery image). Train and
  test labels both count from 0, so they overlap numerically (not in fact) as in MSMT17.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ReIDBenchError, unknown_name
from ..registry import DATASETS
from .files import DEFAULT_VARIABLE_SIZE, find_dataset, image_files, materialize_split, parse_size
from .split import INFRARED, VISIBLE, ReIDSplit, ReIDSubset, TrackletSubset

__all__ = ["vcm_frame_path", "build_hitsz_vcm", "build_sysu_mm01", "build_regdb"]


def _lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [line.strip() for line in fh if line.strip()]


def _int_rows(path: Path, width: Optional[int] = None) -> list[list[int]]:
    rows = []
    for lineno, line in enumerate(_lines(path), 1):
        try:
            row = [int(v) for v in line.replace(",", " ").split()]
        except ValueError:
            raise ReIDBenchError(f"{path}:{lineno}: expected integers, got {line[:80]!r}") from None
        if width is not None and len(row) != width:
            raise ReIDBenchError(f"{path}:{lineno}: expected {width} integers, got {line[:80]!r}")
        rows.append(row)
    return rows


def _check_files(paths: Sequence[str], listed_in: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ReIDBenchError(f"{len(missing)} images listed in {listed_in} are missing, e.g. {missing[0]}")


def _cross_modality_info(base: Path, train, query, gallery, **extra) -> dict:
    return {"root": str(base), "modalities": ["visible", "infrared"], "direction": "infrared-to-visible",
            "num_train": len(train), "num_train_ids": train.num_ids, "num_query": len(query),
            "num_gallery": len(gallery), "num_test_ids": query.num_ids, **extra}


# --------------------------------------------------------------------------- HITSZ-VCM

VCM_INFO = ("info/train_name.txt", "info/track_train_info.txt", "info/test_name.txt", "info/track_test_info.txt",
            "info/query_IDX.txt")


def vcm_frame_path(name: str) -> Optional[str]:
    """``<pid>/<ir|rgb>/<camera>/<file>`` of a HITSZ-VCM frame name, or None when it does not parse:
    ``0001M1D1T001F001.jpg`` -> ``0001/ir/D1/001.jpg``."""
    d, t, f = name.find("D"), name.find("T"), name.find("F")
    if len(name) < 6 or not name[:4].isdigit() or not 5 < d < t < f < len(name) - 1:
        return None
    return f"{name[:4]}/{'ir' if name[5] == '1' else 'rgb'}/{name[d:t]}/{name[f + 1:]}"


def _vcm_subset(base: Path, folder: str, names_file: str, tracks: list[list[int]], seq_len: int,
                min_seq_len: int, first_tracklet: int) -> TrackletSubset:
    names = _lines(base / names_file)
    paths, labels = [], {"pids": [], "camids": [], "modality": [], "tracklet": []}
    for number, (modality, start, end, pid, camid) in enumerate(tracks):
        if not 1 <= start <= end <= len(names):
            raise ReIDBenchError(f"{base / names_file} has {len(names)} frames, but a tracklet spans rows {start}..{end}")
        if end - start + 1 < min_seq_len:
            continue
        for name in names[start - 1:end]:
            relative = vcm_frame_path(name)
            if relative is None:
                raise ReIDBenchError(f"{base / names_file}: cannot read frame name {name!r} "
                                     "(expected e.g. 0001M1D1T001F001.jpg)")
            paths.append(str(base / folder / relative))
            for key, value in zip(labels, (pid, camid, INFRARED if modality == 1 else VISIBLE, first_tracklet + number)):
                labels[key].append(value)
    if not paths:
        raise ReIDBenchError(f"HITSZ-VCM {folder}: no tracklet has at least min_seq_len={min_seq_len} frames")
    subset = TrackletSubset.from_frames(ReIDSubset(paths=paths, **labels), seq_len)
    _check_files(sorted(set(subset.paths)), f"{base / names_file}")
    return subset


@DATASETS.register("hitsz-vcm")
def build_hitsz_vcm(root=None, image_size=None, seq_len: int = 6, min_seq_len: int = 12, **_) -> ReIDSplit:
    """HITSZ-VCM (Lin et al., CVPR 2022): visible-infrared video, 927 identities (500 train),
    12 dual-mode cameras; infrared-to-visible tracklet queries of ``seq_len`` frames."""
    base = find_dataset("hitsz-vcm", ("HITSZ-VCM", "VCM-HITSZ", "hitsz-vcm", "VCM"), root, VCM_INFO + ("Train", "Test"))
    seq_len, min_seq_len = int(seq_len), int(min_seq_len)
    if seq_len < 1 or min_seq_len < 1:
        raise ReIDBenchError(f"hitsz-vcm: seq_len and min_seq_len must be >= 1, got {seq_len}, {min_seq_len}")
    train_tracks = _int_rows(base / "info/track_train_info.txt", 5)
    test_tracks = _int_rows(base / "info/track_test_info.txt", 5)
    query_rows = [i for row in _int_rows(base / "info/query_IDX.txt") for i in row]
    if not query_rows or not all(1 <= i <= len(test_tracks) for i in query_rows):
        raise ReIDBenchError(f"{base / 'info/query_IDX.txt'}: query rows must lie in 1..{len(test_tracks)} "
                             f"(the tracklets of track_test_info.txt)")
    is_query = set(i - 1 for i in query_rows)
    query = [t for i, t in enumerate(test_tracks) if i in is_query]
    gallery = [t for i, t in enumerate(test_tracks) if i not in is_query]
    train = _vcm_subset(base, "Train", "info/train_name.txt", train_tracks, seq_len, min_seq_len, 0)
    offset = len(train_tracks)
    query = _vcm_subset(base, "Test", "info/test_name.txt", query, seq_len, min_seq_len, offset)
    gallery = _vcm_subset(base, "Test", "info/test_name.txt", gallery, seq_len, min_seq_len, offset + len(test_tracks))
    size = parse_size(image_size, DEFAULT_VARIABLE_SIZE)
    split = ReIDSplit("hitsz-vcm", train, query, gallery, image_size=size)
    split.info = _cross_modality_info(base, train, query, gallery, kind="video", seq_len=seq_len,
                                      min_seq_len=min_seq_len)
    return split


# --------------------------------------------------------------------------- SYSU-MM01

SYSU_CAMERAS = {1: VISIBLE, 2: VISIBLE, 3: INFRARED, 4: VISIBLE, 5: VISIBLE, 6: INFRARED}
SYSU_GALLERY_CAMERAS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}


def _sysu_ids(path: Path) -> list[int]:
    ids = [i for row in _int_rows(path) for i in row]
    if not ids:
        raise ReIDBenchError(f"{path} lists no identity")
    return ids


def _sysu_images(base: Path, ids: Sequence[int], cameras: Sequence[int]) -> dict[tuple[int, int], list[str]]:
    out = {}
    for cam in cameras:
        for pid in ids:
            folder = base / f"cam{cam}" / f"{pid:04d}"
            if folder.is_dir():
                names = image_files(folder)
                if names:
                    out[pid, cam] = [str(folder / n) for n in names]
    return out


def _sysu_subset(images: dict[tuple[int, int], list[str]], camera_id) -> ReIDSubset:
    paths, pids, camids, modality = [], [], [], []
    for (pid, cam), files in sorted(images.items()):
        paths += files
        pids += [pid] * len(files)
        camids += [camera_id(cam)] * len(files)
        modality += [SYSU_CAMERAS[cam]] * len(files)
    return ReIDSubset(pids=pids, camids=camids, paths=paths, modality=modality)


@DATASETS.register("sysu-mm01")
def build_sysu_mm01(root=None, image_size=None, mode: str = "all", trial: int = 0, gallery_shots: int = 1,
                    train_with_val: bool = True, same_room_filter: bool = True, materialize: bool = False,
                    **_) -> ReIDSplit:
    """SYSU-MM01 (Wu et al., ICCV 2017): visible-infrared images, 4 visible + 2 infrared
    cameras; infrared queries against a single-shot visible gallery (``mode`` all / indoor)."""
    if mode not in SYSU_GALLERY_CAMERAS:
        raise unknown_name("sysu-mm01 mode", str(mode), SYSU_GALLERY_CAMERAS)
    if int(gallery_shots) < 1:
        raise ReIDBenchError(f"sysu-mm01: gallery_shots must be >= 1, got {gallery_shots}")
    required = ("exp/train_id.txt", "exp/val_id.txt", "exp/test_id.txt") + tuple(f"cam{c}" for c in SYSU_CAMERAS)
    base = find_dataset("sysu-mm01", ("SYSU-MM01", "sysu-mm01", "SYSU_MM01"), root, required)
    train_ids = _sysu_ids(base / "exp/train_id.txt") + (_sysu_ids(base / "exp/val_id.txt") if train_with_val else [])
    test_ids = _sysu_ids(base / "exp/test_id.txt")

    def test_camid(cam: int) -> int:
        # Cameras 2 (visible) and 3 (infrared) film the same room: one camera id for the evaluator.
        return 2 if same_room_filter and cam == 2 else cam - 1

    train = _sysu_subset(_sysu_images(base, train_ids, tuple(SYSU_CAMERAS)), lambda cam: cam - 1)
    query = _sysu_subset(_sysu_images(base, test_ids, (3, 6)), test_camid)
    rng = np.random.default_rng(int(trial))
    gallery_pool = _sysu_images(base, test_ids, SYSU_GALLERY_CAMERAS[mode])
    shots = int(gallery_shots)
    gallery = _sysu_subset({key: sorted(rng.choice(files, size=min(shots, len(files)), replace=False).tolist())
                            for key, files in sorted(gallery_pool.items())}, test_camid)
    for name, subset in (("training", train), ("infrared query", query), ("visible gallery", gallery)):
        if len(subset) == 0:
            raise ReIDBenchError(f"sysu-mm01 at {base}: no {name} images under cam*/<pid:04d>/ for the listed ids")
    size = parse_size(image_size, DEFAULT_VARIABLE_SIZE)
    split = ReIDSplit("sysu-mm01", train, query, gallery, image_size=size)
    split.info = _cross_modality_info(base, train, query, gallery, kind="image", mode=mode, trial=int(trial),
                                      gallery_shots=shots, same_room_filter=bool(same_room_filter))
    return materialize_split(split, f"sysu-mm01-{mode}", size) if materialize else split


# --------------------------------------------------------------------------- RegDB


def _regdb_list(base: Path, list_name: str, modality: int) -> ReIDSubset:
    paths, pids = [], []
    for lineno, line in enumerate(_lines(base / list_name), 1):
        fields = line.split()
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise ReIDBenchError(f"{base / list_name}:{lineno}: expected 'relative/path.bmp label', got {line[:80]!r}")
        paths.append(str(base / fields[0]))
        pids.append(int(fields[1]))
    if not paths:
        raise ReIDBenchError(f"{base / list_name} lists no images")
    _check_files(paths, str(base / list_name))
    # One camera per modality: the camera id is the modality.
    return ReIDSubset(pids=pids, camids=[modality] * len(paths), paths=paths, modality=[modality] * len(paths))


def _concat(a: ReIDSubset, b: ReIDSubset) -> ReIDSubset:
    return ReIDSubset(pids=torch.cat([a.pids, b.pids]), camids=torch.cat([a.camids, b.camids]),
                      paths=list(a.paths) + list(b.paths), modality=torch.cat([a.modality, b.modality]))


@DATASETS.register("regdb")
def build_regdb(root=None, image_size=None, trial: int = 1, materialize: bool = False, **_) -> ReIDSplit:
    """RegDB (Nguyen et al., Sensors 2017): visible-thermal images, 206 train / 206 test
    identities, 10 visible + 10 thermal images each; thermal queries, ``trial`` 1..10."""
    trial = int(trial)
    if not 1 <= trial <= 10:
        raise ReIDBenchError(f"regdb: trial must be 1..10, got {trial}")
    lists = {(part, modality): f"idx/{part}_{modality}_{trial}.txt"
             for part in ("train", "test") for modality in ("visible", "thermal")}
    base = find_dataset("regdb", ("RegDB", "regdb"), root, tuple(lists.values()))
    subsets = {key: _regdb_list(base, name, INFRARED if key[1] == "thermal" else VISIBLE) for key, name in lists.items()}
    train = _concat(subsets["train", "visible"], subsets["train", "thermal"])
    query, gallery = subsets["test", "thermal"], subsets["test", "visible"]
    size = parse_size(image_size, DEFAULT_VARIABLE_SIZE)
    split = ReIDSplit("regdb", train, query, gallery, image_size=size)
    split.info = _cross_modality_info(base, train, query, gallery, kind="image", trial=trial)
    return materialize_split(split, f"regdb-trial{trial}", size) if materialize else split
